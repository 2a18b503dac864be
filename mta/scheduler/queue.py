"""The scheduler: which queued message is tried when, and what follows.

It keeps every queued record in memory, ordered by next attempt.  Due mail is
split by next hop (recipient domain, or smart host); each next hop has a
queue of jobs and up to ``max_per_destination`` workers, all of them under a
global ``max_concurrency``; a worker keeps its connection open for the next
job of the same hop.  Deliveries report an ``Outcome`` per recipient; when
every hop of a message has reported, the scheduler decides: recipients
delivered or refused are final, the rest wait (exponential backoff with
jitter) until the queue lifetime runs out.  Refused and expired recipients
get one DSN, queued with the null sender; mail with the null sender is
never bounced.  Operator actions (flush, hold, release, delete, bounce) go
through here too, so they never race a delivery.

Failure: a spool write that fails after an attempt is logged and the message
stays queued in memory and on disk in its last durable state, so the worst
case is a repeated delivery, never a lost message.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from mta.bounce import dsn
from mta.config import Config
from mta.delivery import result
from mta.delivery.client import ConnectFailed, Connection
from mta.delivery.result import Kind, Outcome
from mta.delivery.route import NextHop, Router
from mta.obs.log import event
from mta.receive import split_header
from mta.scheduler.backoff import retry_delay
from spool import Recipient, Record, Spool, SpoolError
from spool.ids import new_id
from spool.record import DELIVERED, FAILED, PENDING
from spool.store import DEFERRED, HOLD

log = logging.getLogger(__name__)

Opener = Callable[[NextHop], Awaitable[Connection]]


@dataclass
class Job:
    record: Record
    recipients: list[str]


@dataclass
class Destination:
    hop: NextHop
    jobs: deque[Job] = field(default_factory=deque)
    workers: int = 0


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def describe(record: Record) -> dict[str, Any]:
    """The operator's view of a record (``mta queue list --json``)."""
    return {
        "id": record.id,
        "state": record.state,
        "sender": record.sender,
        "recipients": [
            {"address": r.address, "state": r.state, "last_reply": r.last_reply, "remote": r.remote}
            for r in record.recipients
        ],
        "attempts": record.attempts,
        "created": _iso(record.created),
        "next_attempt": _iso(record.next_attempt),
        "expires": _iso(record.expires),
        "size": record.size,
    }


class Scheduler:
    def __init__(
        self,
        spool: Spool,
        config: Config,
        opener: Opener | None,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.spool = spool
        self.config = config
        self.router = Router(config.routes)
        self.opener = opener
        self.clock = clock
        self.rng = rng or random.Random()
        self.records: dict[str, Record] = {}
        self._heap: list[tuple[float, str]] = []
        self._active: set[str] = set()  # in a delivery round or an operator action
        self._outstanding: dict[str, int] = {}  # jobs of the current round not yet reported
        self._outcomes: dict[str, dict[str, Outcome]] = {}
        self._after_round: dict[str, str] = {}
        self._destinations: dict[NextHop, Destination] = {}
        self._slots = asyncio.Semaphore(config.delivery.max_concurrency)
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False

    # -- intake ----------------------------------------------------------

    def load(self, records: Iterable[Record]) -> None:
        for record in records:
            self._track(record)

    def accept(self, record: Record) -> None:
        """A newly spooled message: try it now."""
        self._track(record)

    def _track(self, record: Record) -> None:
        self.records[record.id] = record
        if record.state != HOLD:
            heapq.heappush(self._heap, (record.next_attempt, record.id))
            self._wake.set()  # the loop may be sleeping past this due time

    # -- the loop ----------------------------------------------------------

    async def run(self) -> None:
        while not self._stopping:
            now = self.clock()
            while self._heap and self._heap[0][0] <= now:
                due, record_id = heapq.heappop(self._heap)
                record = self.records.get(record_id)
                if (record is None or record_id in self._active or record.state == HOLD
                        or record.next_attempt != due):
                    continue  # stale heap entry
                self._dispatch(record)
            delay = min(60.0, self._heap[0][0] - now) if self._heap else 60.0
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, delay))

    async def stop(self, deadline: float) -> None:
        """Stop starting attempts; let running ones finish until ``deadline``."""
        self._stopping = True
        self._wake.set()
        remaining = deadline - time.monotonic()
        if self._tasks and remaining > 0:
            await asyncio.wait(set(self._tasks), timeout=remaining)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- delivery rounds ---------------------------------------------------

    def _dispatch(self, record: Record) -> None:
        groups: dict[NextHop, list[str]] = {}
        for rcpt in record.pending():
            hop = self.router.next_hop(rcpt.address.rpartition("@")[2])
            groups.setdefault(hop, []).append(rcpt.address)
        self._active.add(record.id)
        self._outcomes[record.id] = {}
        self._outstanding[record.id] = len(groups)
        if not groups:
            self._spawn(self._finish_round(record))
            return
        for hop, recipients in groups.items():
            destination = self._destinations.setdefault(hop, Destination(hop))
            destination.jobs.append(Job(record, recipients))
            wanted = min(self.config.delivery.max_per_destination, len(destination.jobs))
            while destination.workers < wanted:
                destination.workers += 1
                self._spawn(self._worker(destination))

    async def _worker(self, destination: Destination) -> None:
        connection: Connection | None = None
        per_connection = self.config.delivery.max_messages_per_connection
        try:
            async with self._slots:
                while destination.jobs and not self._stopping:
                    job = destination.jobs.popleft()
                    try:
                        if connection is None or not connection.usable or connection.transactions >= per_connection:
                            if connection is not None:
                                await connection.close()
                            connection = None
                            if self.opener is None:
                                raise ConnectFailed(result.transient("451 4.3.2 delivery is not running"))
                            connection = await self.opener(destination.hop)
                        outcomes = await self._send(connection, job)
                    except ConnectFailed as exc:
                        # The next hop cannot be reached now: that holds for
                        # every job waiting for it, not just this one.
                        event("connect_failed", level=logging.WARNING, destination=str(destination.hop),
                              reply=exc.outcome.reply)
                        self._report(job, dict.fromkeys(job.recipients, exc.outcome))
                        while destination.jobs:
                            other = destination.jobs.popleft()
                            self._report(other, dict.fromkeys(other.recipients, exc.outcome))
                        break
                    except Exception:
                        log.exception("queue_id=%s delivery attempt failed locally", job.record.id)
                        local = result.transient("451 4.3.0 local error during delivery")
                        self._report(job, dict.fromkeys(job.recipients, local))
                        if connection is not None:
                            connection.usable = False
                        continue
                    self._report(job, outcomes)
        finally:
            destination.workers -= 1
            if connection is not None:
                await connection.close()
            if not destination.jobs and destination.workers == 0:
                self._destinations.pop(destination.hop, None)

    async def _send(self, connection: Connection, job: Job) -> dict[str, Outcome]:
        record = job.record
        data = await asyncio.to_thread(self.spool.read_message, record.id)
        smtputf8 = bool(record.attrs.get("smtputf8"))
        eight_bit = bool(record.attrs.get("8bitmime"))
        event("attempt", queue_id=record.id, remote=connection.remote, tls=connection.tls,
              recipients=len(job.recipients), size=record.size)
        return await connection.send(record.sender, job.recipients, data, smtputf8=smtputf8, eight_bit=eight_bit)

    def _report(self, job: Job, outcomes: dict[str, Outcome]) -> None:
        record_id = job.record.id
        self._outcomes[record_id].update(outcomes)
        self._outstanding[record_id] -= 1
        if self._outstanding[record_id] == 0:
            del self._outstanding[record_id]
            self._spawn(self._finish_round(job.record))

    async def _finish_round(self, record: Record) -> None:
        try:
            outcomes = self._outcomes.pop(record.id, {})
            now = self.clock()
            record.attempts += 1
            failed: list[dsn.FailedRecipient] = []
            for rcpt in record.recipients:
                outcome = outcomes.get(rcpt.address)
                if outcome is None or rcpt.state != PENDING:
                    continue
                rcpt.last_reply, rcpt.remote, rcpt.updated = outcome.reply, outcome.remote, now
                fields = {"queue_id": record.id, "sender": record.sender or "<>", "recipient": rcpt.address,
                          "remote": outcome.remote, "reply": outcome.reply, "delay": f"{now - record.created:.1f}"}
                if outcome.kind is Kind.DELIVERED:
                    rcpt.state = DELIVERED
                    event("delivered", **fields)
                elif outcome.kind is Kind.PERMANENT:
                    rcpt.state = FAILED
                    failed.append(dsn.FailedRecipient(rcpt.address, outcome.reply, outcome.remote))
                    event("bounced", level=logging.WARNING, **fields)
                else:
                    event("deferred", **fields)
            action = self._after_round.pop(record.id, None)
            if record.pending() and (now >= record.expires or action == "bounce"):
                failed += self._fail_pending(record, now, expired=action != "bounce")
            await self._conclude(record, failed, action, now)
        finally:
            self._active.discard(record.id)

    def _fail_pending(self, record: Record, now: float, *, expired: bool) -> list[dsn.FailedRecipient]:
        failed = []
        for rcpt in record.pending():
            if expired:
                why = f"4.4.7 message expired after {int(now - record.created)}s in the queue"
                reply = f"{why}; last reply: {rcpt.last_reply}" if rcpt.last_reply else why
            else:
                reply = "5.0.0 message returned to sender by the administrator"
            rcpt.state, rcpt.last_reply, rcpt.updated = FAILED, reply, now
            failed.append(dsn.FailedRecipient(rcpt.address, reply, rcpt.remote if expired else None, expired))
            event("expired" if expired else "bounced", level=logging.WARNING, queue_id=record.id,
                  sender=record.sender or "<>", recipient=rcpt.address, reply=reply)
        return failed

    async def _conclude(self, record: Record, failed: list[dsn.FailedRecipient], action: str | None,
                        now: float) -> None:
        """Persist what a round (or an operator) decided."""
        try:
            if failed:
                await self._bounce(record, failed, now)
            if action == "delete":
                await self._forget(record, "deleted by the administrator")
            elif not record.pending():
                await self._forget(record, None)
            elif action == "hold":
                self.records[record.id] = await self.spool.save(record, HOLD)
            else:
                delay = retry_delay(record.attempts, self.config.queue.retry_initial, self.config.queue.retry_max,
                                    self.config.queue.retry_jitter, self.rng)
                # One last attempt at expiry rather than a silent expiry later.
                record.next_attempt = max(now + 1.0, min(now + delay, record.expires))
                saved = await self.spool.save(record, DEFERRED)
                self._track(saved)
        except SpoolError as exc:
            # Keep it in memory; the file still holds its last durable state.
            log.error("queue_id=%s spool update failed, will retry: %s", record.id, exc)
            record.next_attempt = now + self.config.queue.retry_initial
            self._track(record)

    async def _forget(self, record: Record, why: str | None) -> None:
        await self.spool.remove(record)
        self.records.pop(record.id, None)
        event("removed", queue_id=record.id, reason=why or "all recipients done")

    async def _bounce(self, record: Record, failed: list[dsn.FailedRecipient], now: float) -> None:
        if not record.sender:
            # A bounce never bounces: RFC 3464 / RFC 5321 §4.5.5.
            event("bounce_suppressed", level=logging.WARNING, queue_id=record.id,
                  reason="null sender", recipients=len(failed))
            return
        original = await asyncio.to_thread(self.spool.read_message, record.id)
        header, _ = split_header(original)
        message = dsn.build(
            reporting_mta=self.config.hostname,
            queue_id=record.id,
            original_sender=record.sender,
            original_header=header,
            arrival=datetime.fromtimestamp(record.created, UTC),
            failed=failed,
            now=datetime.fromtimestamp(now, UTC),
        )
        notice = Record(
            id=new_id(now),
            sender="",
            recipients=[Recipient(record.sender)],
            created=now,
            expires=now + self.config.queue.bounce_lifetime,
            next_attempt=now,
            size=len(message),
            attrs={"dsn_for": record.id},
        )
        stored = await self.spool.store(message, notice)
        event("queued", queue_id=stored.id, sender="<>", recipients=1, size=stored.size, dsn_for=record.id)
        self.accept(stored)

    # -- operator actions ----------------------------------------------------

    def list(self) -> list[dict[str, Any]]:
        return [describe(r) for r in sorted(self.records.values(), key=lambda r: r.created)]

    def show(self, record_id: str) -> dict[str, Any] | None:
        record = self.records.get(record_id)
        if record is None:
            return None
        info = describe(record)
        try:
            header, _ = split_header(self.spool.read_message(record_id))
            info["header"] = header.decode("utf-8", errors="replace")
        except SpoolError:
            info["header"] = None
        return info

    async def act(self, action: str, ids: list[str]) -> dict[str, str]:
        """Apply an operator action; returns a word of result per id."""
        if action == "flush" and not ids:
            ids = [r.id for r in self.records.values() if r.state != HOLD]
        results = {}
        for record_id in ids:
            results[record_id] = await self._act_one(action, record_id)
        self._wake.set()
        return results

    async def _act_one(self, action: str, record_id: str) -> str:
        record = self.records.get(record_id)
        if record is None:
            return "unknown id"
        if record_id in self._active:
            if action in ("delete", "hold", "bounce"):
                self._after_round[record_id] = action
                return "will be done when the current delivery attempt ends"
            return "being delivered now"
        self._active.add(record_id)
        try:
            now = self.clock()
            if action == "flush":
                if record.state == HOLD:
                    return "on hold; release it first"
                record.next_attempt = now
                self._track(await self.spool.save(record))
                return "ok"
            if action == "release":
                if record.state != HOLD:
                    return "not on hold"
                record.next_attempt = now
                self._track(await self.spool.save(record, DEFERRED))
                return "ok"
            if action == "hold":
                if record.state == HOLD:
                    return "already on hold"
                self.records[record_id] = await self.spool.save(record, HOLD)
                event("held", queue_id=record_id)
                return "ok"
            if action == "delete":
                await self._forget(record, "deleted by the administrator")
                return "ok"
            if action == "bounce":
                failed = self._fail_pending(record, now, expired=False)
                await self._conclude(record, failed, None, now)
                return "ok"
            return f"unknown action {action!r}"
        except SpoolError as exc:
            log.error("queue_id=%s %s failed: %s", record_id, action, exc)
            return f"failed: {exc}"
        finally:
            self._active.discard(record_id)
