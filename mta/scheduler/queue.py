"""The scheduler: which queued message is tried when, and what follows.

Every queued record is kept in memory, due times in a heap
(``mta.scheduler.due``).  Due mail is split by next hop (recipient domain,
or smart host); each hop has a job queue and up to ``max_per_destination``
lanes — coroutines handing its jobs to the courier (``mta.delivery.courier``)
one after another so a connection is reused — under a global
``max_concurrency`` (``mta.scheduler.slots``: an idle lane gives its slot to
any lane waiting for one) and a deployment-wide lease per connection
(``mta.scheduler.leases``).  A route that is down sends its mail to its
fallback (``mta.scheduler.failover``).  When every hop of a message has
reported, ``mta.scheduler.verdict`` judges the round: delivered or refused is
final, the rest wait (backoff with jitter) until the queue lifetime runs
out; refused and expired recipients get one DSN (``mta.bounce.bouncer``).
Operator actions (``mta.scheduler.operator``) go through here too, so they
never race a delivery.

Failure: a spool write that fails after an attempt is logged and the message
stays queued in memory and on disk in its last durable state, so the worst
case is a repeated delivery, never a lost message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Iterable
from typing import Any

from mta.bounce.bouncer import Bouncer
from mta.bounce.dsn import ReportedRecipient
from mta.config import Config
from mta.delivery import result
from mta.delivery.courier import Courier, Report
from mta.delivery.result import Kind, Outcome
from mta.delivery.route import NextHop, Router
from mta.intake import Intake
from mta.limits.store import LimitsStore
from mta.obs.log import event
from mta.scheduler.backoff import retry_delay
from mta.scheduler.destination import IDLE_CONNECTION, Destination, Job
from mta.scheduler.due import DueTimes
from mta.scheduler.failover import Failover
from mta.scheduler.leases import ConnectionLeases, Lease
from mta.scheduler.shaping import Shaper
from mta.scheduler.slots import DeliverySlots
from mta.scheduler.verdict import fail_pending, judge
from mta.suppression import SuppressionList, scope_for
from spool import Record, Spool, SpoolError
from spool.store import DEFERRED, HOLD

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(
        self,
        spool: Spool,
        config: Config,
        courier: Courier | None,
        bouncer: Bouncer | None = None,
        *,
        clock: Any = time.time,
        rng: random.Random | None = None,
        limits: LimitsStore | None = None,
    ) -> None:
        self.spool = spool
        self.courier = courier
        self.bouncer = bouncer
        egress = config.identity.egress_address
        self.shaper = Shaper(config.shaping, config.delivery.max_per_destination,
                             config.delivery.max_messages_per_connection, routes=config.routes, store=limits,
                             egress=str(egress) if egress is not None else config.hostname,
                             lease_ttl=config.limits.store.lease_ttl, jitter=config.queue.retry_jitter,
                             rng=rng)
        self.leases = ConnectionLeases(self.shaper, config.hostname)
        self._capped = False
        # Why delivery is paused (a failing self-check under identity.enforce), or None.
        self.paused: str | None = None
        self.config = config
        self.router = Router(config.routes)
        self.failover = Failover(config, self.router)
        self._reroute: set[str] = set()  # in a round when their route's breaker opened
        self.classifier = config.bounces.classifier()
        # Where hard bounces of a dead address go (mta.suppression); None: nowhere.
        self.suppressions: SuppressionList | None = None
        self.clock = clock
        self.rng = rng or random.Random()
        self.records: dict[str, Record] = {}
        self.loaded = asyncio.Event()  # the spool's earlier mail is tracked too (load)
        self._due = DueTimes()
        self.active: set[str] = set()  # in a delivery round or an operator action
        self._outstanding: dict[str, int] = {}  # jobs of the current round not yet reported
        self._outcomes: dict[str, dict[str, Outcome]] = {}
        self.after_round: dict[str, str] = {}  # operator actions waiting for a round to end
        self._destinations: dict[NextHop, Destination] = {}
        self._slots = DeliverySlots(config.delivery.max_concurrency)
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._stop_asked = asyncio.Event()

    # -- what is queued ------------------------------------------------------

    def load(self, records: Iterable[Record]) -> None:
        """The spool's earlier mail, loaded (perhaps after new mail was accepted): then ``loaded`` is set."""
        for record in records:
            if record.id not in self.records:
                self.track(record)
        self.loaded.set()

    def accept(self, record: Record) -> None:
        """A newly spooled message: try it now (once, however often it is announced)."""
        if record.id not in self.records:
            self.track(record)

    def track(self, record: Record) -> None:
        """Keep ``record`` and try it at its ``next_attempt`` (unless it is on hold)."""
        self.records[record.id] = record
        if record.state != HOLD:
            self._due.push(record.next_attempt, record.id)
            self._wake.set()  # the loop may be sleeping past this due time

    def snapshot(self) -> tuple[dict[str, int], int, float | None]:
        """For metrics: (messages by spool state, messages in a round, oldest creation time)."""
        by_state: dict[str, int] = {}
        oldest: float | None = None
        for record in self.records.values():
            by_state[record.state] = by_state.get(record.state, 0) + 1
            if oldest is None or record.created < oldest:
                oldest = record.created
        return by_state, len(self.active), oldest

    def wake(self) -> None:
        self._wake.set()

    # -- the loop ----------------------------------------------------------

    async def run(self) -> None:
        while not self._stopping:
            now = self.clock()
            capped = await self.shaper.daily_cap_reached()
            if capped != self._capped:
                event("daily_cap_reached" if capped else "daily_cap_reset", level=logging.WARNING,
                      cap=self.shaper.daily_cap())
                self._capped = capped
            if self.paused is None and not capped:
                for record_id in self._due.pop_due(now, self._stands):
                    self._dispatch(self.records[record_id])
            # pause() wakes the loop; the cap is looked at again each minute
            delay = 60.0 if self.paused is not None or capped else self._due.wait(now, 60.0)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    def _stands(self, record_id: str, due: float) -> bool:
        """Whether a due entry is still this record's next attempt (not moved on, held, gone or in a round)."""
        record = self.records.get(record_id)
        return (record is not None and record_id not in self.active and record.state != HOLD
                and record.next_attempt == due)

    def pause(self, reason: str | None) -> None:
        """Hold all delivery (mail stays queued) while ``reason`` is set."""
        if reason != self.paused:
            event("delivery_paused" if reason else "delivery_resumed", level=logging.WARNING, reason=reason)
        self.paused = reason
        self._wake.set()

    async def stop(self, deadline: float) -> None:
        """Stop starting attempts; let running ones finish until ``deadline``."""
        self._stopping = True
        self._stop_asked.set()
        self._wake.set()
        for destination in self._destinations.values():
            destination.nudge()  # idle lanes leave now
        remaining = deadline - time.monotonic()
        if self._tasks and remaining > 0:
            await asyncio.wait(set(self._tasks), timeout=remaining)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5)
        if self.courier is not None:
            await self.courier.close()

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- delivery rounds ---------------------------------------------------

    def _dispatch(self, record: Record) -> None:
        groups: dict[NextHop, list[str]] = {}
        open_routes: dict[str, bool] = {}  # asked once per round: a half-open breaker's probe is one message
        for rcpt in record.pending():
            domain = rcpt.address.rpartition("@")[2]
            hop = self.failover.next_hop(self.router.next_hop(domain), domain, record.sender, open_routes)
            groups.setdefault(hop, []).append(rcpt.address)
        self.active.add(record.id)
        self._outcomes[record.id] = {}
        self._outstanding[record.id] = len(groups)
        if not groups:
            self._spawn(self._finish_round(record))
            return
        for hop, recipients in groups.items():
            allowed = self.shaper.connections(hop.name)
            if allowed == 0:
                # The destination told us to slow down: wait out its cool-down.
                wait = int(self.shaper.wait(hop.name))
                slow = result.transient(451, "4.7.0", f"{hop} asked to slow down; next try in {wait}s or later")
                self._report(Job(record, recipients), dict.fromkeys(recipients, slow))
                continue
            destination = self._destinations.setdefault(hop, Destination(hop))
            destination.jobs.append(Job(record, recipients))
            destination.nudge()
            wanted = min(allowed, len(destination.jobs))
            while destination.lanes < wanted:
                destination.lanes += 1
                self._spawn(self._lane(destination))

    def _count_attempt(self, hop: NextHop, report: Report, jobs: int) -> None:
        """Tell the route's breaker; when it just opened, mail waiting out a retry for it goes to its fallback now."""
        opened = self.failover.count(hop, report, jobs)
        if opened is None:
            return
        now = self.clock()
        for record in self.records.values():
            if record.state == HOLD or not self.failover.routed_by(record, opened):
                continue
            if record.id in self.active:
                self._reroute.add(record.id)  # conclude() schedules it at once
            else:
                record.next_attempt = now
                self._due.push(now, record.id)
        self._wake.set()

    async def _lane(self, destination: Destination) -> None:
        """Hand ``destination``'s jobs to the courier one at a time, while there are any.

        It holds a delivery slot only while it delivers: idle, it parks its
        slot (``mta.scheduler.slots``) and leaves when another lane needs it.
        """
        hop, name = destination.hop, destination.hop.name
        per_connection = self.shaper.state(name).messages_per_connection
        wake, busy = asyncio.Event(), False
        lease: Lease | None = None
        try:
            while not self._stopping:
                if lease is None:
                    lease = await self.leases.take(destination, lambda: self._stopping)
                    if lease is None:
                        break
                    continue  # other lanes may have taken the jobs meanwhile
                if lease.lost.is_set():
                    break  # the slot went to another pod while the store was away
                if not destination.jobs:
                    if busy:
                        self._slots.park(wake, wake)
                        busy = False
                    destination.idle.add(wake)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), IDLE_CONNECTION)
                    destination.idle.discard(wake)
                    wake.clear()
                    # The job list decides, not how the wait ended: a job queued while
                    # the timeout cancelled the wait counted on this lane to take it.
                    if destination.jobs:
                        continue
                    break
                if not busy:
                    if not self._slots.resume(wake):
                        await self._slots.take()
                    busy = True
                    continue  # other lanes may have taken the jobs meanwhile
                refusal, pause = await self.shaper.hold_back(name, str(hop))
                if refusal is not None:
                    self._defer_all(destination, result.transient(451, "4.7.0", refusal))
                    break
                if pause > 0:  # a messages-per-minute rule; a stop does not wait for the minute
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop_asked.wait(), pause)
                    continue
                job = destination.jobs.popleft()
                destination.delivering += 1
                try:
                    with self.shaper.admitted(name):  # a route's quota counts it from now on
                        report = await self._deliver(hop, job, per_connection)
                finally:
                    destination.delivering -= 1
                self._report(job, report.outcomes)
                if not report.reached:
                    # The next hop cannot be reached now: that holds for
                    # every job waiting for it, not just this one.
                    deferred = self._defer_all(destination, next(iter(report.outcomes.values())))
                    self._count_attempt(hop, report, 1 + deferred)
                    break
                self._count_attempt(hop, report, 1)
                if report.server is not None:
                    self.shaper.learn_mx(name, report.server)
                if await self._throttled(destination, report):
                    break
        finally:
            destination.idle.discard(wake)
            if busy:
                self._slots.give_back()
            else:
                self._slots.leave(wake)
            destination.lanes -= 1
            if lease is not None:
                destination.leased -= 1
            if destination.jobs and not destination.lanes and not self._stopping:
                # Only a lease lost or never given leaves jobs behind: they wait for a slot.
                self._defer_all(destination, result.transient(
                    451, "4.7.0", f"{hop}: the deployment's {self.shaper.state(name).allowance} connections "
                                  "to it are all in use; next try later"))
            if self.courier is not None:
                # Open connections stay within the slots still held: idle ones beyond are closed.
                await self.courier.release(hop, keep=max(0, destination.leased - destination.delivering))
            if lease is not None:
                await self.leases.end(destination, lease)
            # While release() awaited, the hop may have been queued for anew under a new record.
            if not destination.jobs and destination.lanes == 0 and self._destinations.get(hop) is destination:
                del self._destinations[hop]

    async def _deliver(self, hop: NextHop, job: Job, per_connection: int) -> Report:
        if self.courier is None:
            down = result.transient(451, "4.3.2", "delivery is not running")
            return Report(dict.fromkeys(job.recipients, down), reached=False)
        return await self.courier.deliver(hop, job.parcel(), per_connection)

    async def _throttled(self, destination: Destination, report: Report) -> bool:
        """Tell the shaper about a transaction; on a throttle reply, back off the whole hop."""
        first = next(iter(report.outcomes.values()), None)
        if first is None:
            return False
        delivered = any(o.kind is Kind.DELIVERED for o in report.outcomes.values())
        name = destination.hop.name
        if not await self.shaper.sent(name, first.reply, delivered):
            return False
        event("throttled", level=logging.WARNING, destination=str(destination.hop), reply=str(first.reply),
              cooldown=round(self.shaper.wait(name)))
        if self.courier is not None:
            await self.courier.discard(destination.hop)
        self._defer_all(destination, result.transient(
            451, "4.7.0", f"{destination.hop} asked to slow down: {first.reply}"))
        return True

    def _defer_all(self, destination: Destination, outcome: Outcome) -> int:
        """Every job still waiting for ``destination`` gets ``outcome`` (it cannot be reached now); how many."""
        count = 0
        while destination.jobs:
            job = destination.jobs.popleft()
            self._report(job, dict.fromkeys(job.recipients, outcome))
            count += 1
        return count

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
            verdict = judge(record, outcomes, now, self.classifier)
            failed = verdict.failed
            action = self.after_round.pop(record.id, None)
            if record.pending() and (now >= record.expires or action == "bounce"):
                failed += fail_pending(record, now, self.classifier, expired=action != "bounce")
            if verdict.dead and self.suppressions is not None:
                user = record.attrs.get("user")
                scope = scope_for(self.config.suppression.scope, record.sender, user if isinstance(user, str) else None)
                await self.suppressions.add_bounced(record.id, verdict.dead, scope)
            await self.conclude(record, failed, action, now, verdict.relayed)
        finally:
            self.active.discard(record.id)

    async def conclude(self, record: Record, failed: list[ReportedRecipient], action: str | None,
                       now: float, relayed: list[ReportedRecipient] | None = None) -> None:
        """Persist what a round (or an operator) decided, after the notices it calls for."""
        try:
            if self.bouncer is not None:
                await self.bouncer.report(record, failed, relayed or [], now)
            if action == "delete":
                await self.forget(record, "deleted by the administrator")
            elif not record.pending():
                await self.forget(record, None)
            elif action == "hold":
                self.records[record.id] = await self.spool.save(record, HOLD)
            else:
                rerouted = record.id in self._reroute  # its route opened during the round: fallback now
                self._reroute.discard(record.id)
                delay = 0.0 if rerouted else retry_delay(record.attempts, self.config.queue.retry_initial,
                                                         self.config.queue.retry_max, self.config.queue.retry_jitter,
                                                         self.rng)
                # One last attempt at expiry rather than a silent expiry later.
                record.next_attempt = max(now + 1.0, min(now + delay, record.expires))
                saved = await self.spool.save(record, DEFERRED)
                self.track(saved)
        except SpoolError as exc:
            # Keep it in memory; the file still holds its last durable state.
            log.error("queue_id=%s spool update failed, will retry: %s", record.id, exc)
            record.next_attempt = now + self.config.queue.retry_initial
            self.track(record)

    async def forget(self, record: Record, why: str | None) -> None:
        await self.spool.remove(record)
        self.records.pop(record.id, None)
        event("removed", queue_id=record.id, reason=why or "all recipients done")


def assemble(spool: Spool, config: Config, courier: Courier | None, *, clock: Any = time.time,
             rng: random.Random | None = None, limits: LimitsStore | None = None) -> tuple[Scheduler, Intake]:
    """A scheduler and the intake that feeds it, bounces included, in one process."""
    scheduler = Scheduler(spool, config, courier, clock=clock, rng=rng, limits=limits)
    intake = Intake(spool, scheduler.accept, config.queue.lifetime, clock=clock)
    scheduler.bouncer = Bouncer(intake, spool.message, config.hostname, config.queue.bounce_lifetime,
                                config.queue.delay_warning)
    return scheduler, intake
