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
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from mta.bounce import dsn
from mta.config import Config
from mta.delivery import result
from mta.delivery.client import ConnectFailed, Connection, StaleConnection
from mta.delivery.result import Kind, Outcome
from mta.delivery.route import NextHop, Router
from mta.dkim.signer import Signer, SigningError
from mta.message import split_header
from mta.obs.log import event
from mta.scheduler.backoff import retry_delay
from mta.scheduler.shaping import Shaper
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
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # a job was queued


# How long a worker keeps its connection open waiting for more mail for the
# same next hop: a steady trickle then reuses one session instead of opening
# (and closing) one per message.
IDLE_CONNECTION = 2.0


_REMOTE = re.compile(r"^(.*)\[([^\]]+)\]$")


def _remote_fields(remote: str | None) -> dict[str, Any]:
    """``mx.example.com[192.0.2.1]`` -> host and address as fields of their own."""
    match = _REMOTE.match(remote or "")
    if not match:
        return {}
    return {"mx_host": match.group(1) or None, "mx_ip": match.group(2)}


def _tls_fields(connection: Connection) -> dict[str, Any]:
    details = connection.tls_details()
    if details is None:
        return {"tls": False}
    return {"tls": True, "tls_version": details[0], "tls_cipher": details[1]}


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _reply_code(reply: str) -> int | None:
    head = reply[:3]
    return int(head) if head.isdigit() else None


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
        signer: Signer | None = None,
    ) -> None:
        self.spool = spool
        self.signer = signer
        self.shaper = Shaper(config.shaping, config.delivery.max_per_destination,
                             config.delivery.max_messages_per_connection)
        self._capped = False
        # Why delivery is paused (a failing self-check under identity.enforce), or None.
        self.paused: str | None = None
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
        self._session_info: dict[str, dict[str, dict[str, Any]]] = {}  # for the outcome events: TLS per recipient
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
        """A newly spooled message: try it now (once, however often it is announced)."""
        if record.id not in self.records:
            self._track(record)

    def _track(self, record: Record) -> None:
        self.records[record.id] = record
        if record.state != HOLD:
            heapq.heappush(self._heap, (record.next_attempt, record.id))
            self._wake.set()  # the loop may be sleeping past this due time

    def snapshot(self) -> tuple[dict[str, int], int, float | None]:
        """For metrics: (messages by spool state, messages in a round, oldest creation time)."""
        by_state: dict[str, int] = {}
        oldest: float | None = None
        for record in self.records.values():
            by_state[record.state] = by_state.get(record.state, 0) + 1
            if oldest is None or record.created < oldest:
                oldest = record.created
        return by_state, len(self._active), oldest

    # -- the loop ----------------------------------------------------------

    async def run(self) -> None:
        while not self._stopping:
            now = self.clock()
            capped = self.shaper.daily_cap_reached()
            if capped != self._capped:
                event("daily_cap_reached" if capped else "daily_cap_reset", level=logging.WARNING,
                      cap=self.config.shaping.daily_cap)
                self._capped = capped
            while self._heap and self._heap[0][0] <= now and self.paused is None and not capped:
                due, record_id = heapq.heappop(self._heap)
                record = self.records.get(record_id)
                if (record is None or record_id in self._active or record.state == HOLD
                        or record.next_attempt != due):
                    continue  # stale heap entry
                self._dispatch(record)
            delay = min(60.0, self._heap[0][0] - now) if self._heap else 60.0
            if self.paused is not None or capped:
                delay = 60.0  # pause() wakes the loop; the cap is looked at again each minute
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, delay))

    def pause(self, reason: str | None) -> None:
        """Hold all delivery (mail stays queued) while ``reason`` is set."""
        if reason != self.paused:
            event("delivery_paused" if reason else "delivery_resumed", level=logging.WARNING, reason=reason)
        self.paused = reason
        self._wake.set()

    async def stop(self, deadline: float) -> None:
        """Stop starting attempts; let running ones finish until ``deadline``."""
        self._stopping = True
        self._wake.set()
        for destination in self._destinations.values():
            destination.arrived.set()  # idle workers leave now
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
            allowed = self.shaper.connections(hop.name)
            if allowed == 0:
                # The destination told us to slow down: wait out its cool-down.
                reply = f"451 4.7.0 {hop} asked to slow down; next try in {int(self.shaper.wait(hop.name))}s or later"
                self._report(Job(record, recipients), dict.fromkeys(recipients, result.transient(reply)))
                continue
            destination = self._destinations.setdefault(hop, Destination(hop))
            destination.jobs.append(Job(record, recipients))
            destination.arrived.set()
            wanted = min(allowed, len(destination.jobs))
            while destination.workers < wanted:
                destination.workers += 1
                self._spawn(self._worker(destination))

    async def _worker(self, destination: Destination) -> None:
        connection: Connection | None = None
        name = destination.hop.name
        per_connection = self.shaper.state(name).messages_per_connection
        try:
            async with self._slots:
                while not self._stopping:
                    if not destination.jobs:
                        destination.arrived.clear()
                        try:
                            await asyncio.wait_for(destination.arrived.wait(), IDLE_CONNECTION)
                        except TimeoutError:
                            break
                        continue
                    pause = self.shaper.wait(name)
                    if pause > 60:
                        slow_down = f"451 4.7.0 {destination.hop} asked to slow down"
                        self._defer_all(destination, result.transient(slow_down))
                        break
                    if pause > 0:
                        await asyncio.sleep(pause)  # a messages-per-minute rule
                        continue
                    job = destination.jobs.popleft()
                    try:
                        if connection is None or not connection.usable or connection.transactions >= per_connection:
                            if connection is not None:
                                await connection.close()
                            connection = None
                            if self.opener is None:
                                raise ConnectFailed(result.transient("451 4.3.2 delivery is not running"))
                            connection = await self.opener(destination.hop)
                            self.shaper.learn_mx(name, connection.remote.split("[", 1)[0])
                        try:
                            outcomes = await self._send(connection, job)
                        except StaleConnection:
                            # Nothing was sent on the old session: once more on a fresh one.
                            await connection.close()
                            connection = None
                            connection = await self.opener(destination.hop)
                            outcomes = await self._send(connection, job)
                    except ConnectFailed as exc:
                        # The next hop cannot be reached now: that holds for
                        # every job waiting for it, not just this one.
                        event("connect_failed", level=logging.WARNING, destination=str(destination.hop),
                              reply=exc.outcome.reply)
                        self._report(job, dict.fromkeys(job.recipients, exc.outcome))
                        self._defer_all(destination, exc.outcome)
                        break
                    except Exception:
                        log.exception("queue_id=%s delivery attempt failed locally", job.record.id)
                        local = result.transient("451 4.3.0 local error during delivery")
                        self._report(job, dict.fromkeys(job.recipients, local))
                        if connection is not None:
                            connection.usable = False
                        continue
                    self._report(job, outcomes)
                    first = next(iter(outcomes.values()), None)
                    delivered = any(o.kind is Kind.DELIVERED for o in outcomes.values())
                    if first is not None and self.shaper.sent(name, first.reply, delivered):
                        event("throttled", level=logging.WARNING, destination=str(destination.hop),
                              reply=first.reply, cooldown=round(self.shaper.wait(name)))
                        connection.usable = False
                        self._defer_all(destination, result.transient(
                            f"451 4.7.0 {destination.hop} asked to slow down: {first.reply}"))
                        break
        finally:
            destination.workers -= 1
            if connection is not None:
                await connection.close()
            if not destination.jobs and destination.workers == 0:
                self._destinations.pop(destination.hop, None)

    def _defer_all(self, destination: Destination, outcome: Outcome) -> None:
        """Every job still waiting for ``destination`` gets ``outcome`` (it cannot be reached now)."""
        while destination.jobs:
            job = destination.jobs.popleft()
            self._report(job, dict.fromkeys(job.recipients, outcome))

    async def _send(self, connection: Connection, job: Job) -> dict[str, Outcome]:
        record = job.record
        data = await self.spool.message(record.id)
        if self.signer is not None:
            try:
                data = self.signer.sign(data)
            except SigningError as exc:
                # Never send unsigned what a key is configured for: try later.
                event("dkim_failed", level=logging.ERROR, queue_id=record.id, reason=str(exc))
                return dict.fromkeys(job.recipients, result.transient(f"451 4.7.0 {exc}"))
        smtputf8 = bool(record.attrs.get("smtputf8"))
        eight_bit = bool(record.attrs.get("8bitmime"))
        domain = job.recipients[0].rpartition("@")[2].lower() if job.recipients else None
        tls = _tls_fields(connection)
        event("attempt", queue_id=record.id, remote=connection.remote, **tls,
              recipients=len(job.recipients), size=record.size, domain=domain)
        started = time.monotonic()
        outcomes = await connection.send(record.sender, job.recipients, data, smtputf8=smtputf8,
                                         eight_bit=eight_bit)
        event("attempt_done", level=logging.DEBUG, queue_id=record.id, remote=connection.remote, domain=domain,
              duration=round(time.monotonic() - started, 6), recipients=len(job.recipients))
        self._session_info.setdefault(record.id, {}).update(dict.fromkeys(job.recipients, tls))
        return outcomes

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
            sessions = self._session_info.pop(record.id, {})
            now = self.clock()
            record.attempts += 1
            failed: list[dsn.FailedRecipient] = []
            for rcpt in record.recipients:
                outcome = outcomes.get(rcpt.address)
                if outcome is None or rcpt.state != PENDING:
                    continue
                rcpt.last_reply, rcpt.remote, rcpt.updated = outcome.reply, outcome.remote, now
                fields = {"queue_id": record.id, "sender": record.sender or "<>", "recipient": rcpt.address,
                          "remote": outcome.remote, **_remote_fields(outcome.remote),
                          **sessions.get(rcpt.address, {}), "reply": outcome.reply,
                          "code": _reply_code(outcome.reply), "enhanced": outcome.enhanced,
                          "delay": round(now - record.created, 3), "size": record.size, "attempts": record.attempts}
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
                  sender=record.sender or "<>", recipient=rcpt.address, reply=reply,
                  enhanced="4.4.7" if expired else "5.0.0", delay=round(now - record.created, 3),
                  size=record.size, attempts=record.attempts)
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
        original = await self.spool.message(record.id)
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
