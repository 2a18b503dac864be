"""The scheduler's decisions, driven by a courier of the tests' own and a clock they move.

A real spool on disk, the real intake and bouncer; only the courier is
replaced (chasquid's ``testlib.TestCourier``): it reports what each test
tells it to, and can hold a delivery open so that a test acts in the
middle of a round.  Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mta.config import Config
from mta.delivery import result
from mta.delivery.courier import Parcel, Report
from mta.delivery.result import Outcome
from mta.delivery.route import NextHop
from mta.intake import Envelope, Intake
from mta.replies import Reply
from mta.scheduler.operator import Operator
from mta.scheduler.queue import Scheduler, assemble
from spool import Spool, SpoolError
from spool.record import FAILED, PENDING
from spool.store import DEFERRED, HOLD, INCOMING

OK = result.from_reply(Reply(250, "2.0.0", "Ok"), "mx.example.net", "192.0.2.25")
LATER = result.from_reply(Reply(451, "4.3.0", "try later"), "mx.example.net", "192.0.2.25")
NEVER = result.from_reply(Reply(550, "5.1.1", "no such user"), "mx.example.net", "192.0.2.25")


@dataclass
class TestCourier:
    """Reports ``outcome`` for every recipient; ``gate``, when set, holds each delivery until opened."""

    outcome: Outcome = OK
    reached: bool = True
    gate: asyncio.Event | None = None
    delivered: list[Parcel] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    finished_at: list[float] = field(default_factory=list)  # the loop's time as each delivery returned
    duration: float = 0.0  # how long each delivery takes (on the loop's clock)
    in_flight: int = 0
    peak: int = 0  # most deliveries at once
    released: list[tuple[str, int]] = field(default_factory=list)  # (hop, keep) of each release()

    __test__ = False  # not a test class, whatever its name

    async def deliver(self, hop: NextHop, parcel: Parcel, per_connection: int) -> Report:
        self.started.set()
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.duration:
                await asyncio.sleep(self.duration)
        finally:
            self.in_flight -= 1
        self.delivered.append(parcel)
        self.finished_at.append(asyncio.get_running_loop().time())
        return Report(dict.fromkeys(parcel.recipients, self.outcome), reached=self.reached,
                      server="mx.example.net" if self.reached else None)

    async def release(self, hop: NextHop, keep: int) -> None:
        self.released.append((hop.name, keep))

    async def discard(self, hop: NextHop) -> None:
        pass

    async def close(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Queue:
    scheduler: Scheduler
    intake: Intake
    courier: TestCourier
    clock: Clock
    spool: Spool

    async def put(self, *recipients: str, sender: str = "app@example.com") -> str:
        stored = await self.intake.put(Envelope(sender, list(recipients)), b"Subject: t\r\n\r\nbody\r\n")
        return stored.id

    async def until(self, condition: Callable[[], bool], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not condition():
                await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running_queue(tmp_path: Path, delivery: dict[str, object] | None = None) -> AsyncIterator[Queue]:
    config = Config.model_validate({"hostname": "mta.example.com", "spool": {"path": str(tmp_path)},
                                    "queue": {"retry_initial": "5m", "retry_max": "1h", "lifetime": "1h"},
                                    "delivery": delivery or {}})
    spool = Spool(config.spool_shard, config.spool.sync)
    spool.open()
    courier = TestCourier()
    clock = Clock()
    scheduler, intake = assemble(spool, config, courier, clock=clock)  # type: ignore[arg-type]
    errors: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(context))
    loop = asyncio.create_task(scheduler.run())
    try:
        yield Queue(scheduler, intake, courier, clock, spool)
    finally:
        await scheduler.stop(time.monotonic() + 1)
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        spool.close()
    # A lane or round that died would strand mail: none may.
    assert not errors, errors


Scenario = Callable[[Queue], Awaitable[None]]


def run(tmp_path: Path, scenario: Scenario) -> None:
    async def main() -> None:
        async with running_queue(tmp_path) as queue:
            await asyncio.wait_for(scenario(queue), 20)

    asyncio.run(main())


def on_disk(spool: Spool, state: str, record_id: str) -> bool:
    return (spool.root / state / f"{record_id}.json").exists()


def test_delivered_mail_leaves_the_spool(tmp_path: Path) -> None:
    async def scenario(queue: Queue) -> None:
        record_id = await queue.put("u@example.net")
        await queue.until(lambda: record_id not in queue.scheduler.records)
        assert [p.queue_id for p in queue.courier.delivered] == [record_id]
        assert not on_disk(queue.spool, INCOMING, record_id)

    run(tmp_path, scenario)


def test_transient_failure_waits_with_backoff(tmp_path: Path) -> None:
    async def scenario(queue: Queue) -> None:
        queue.courier.outcome = LATER
        record_id = await queue.put("u@example.net")
        await queue.until(lambda: on_disk(queue.spool, DEFERRED, record_id))
        record = queue.scheduler.records[record_id]
        assert record.attempts == 1 and record.recipients[0].state == PENDING
        assert record.recipients[0].last_reply == "451 4.3.0 try later"
        assert 240 <= record.next_attempt - queue.clock.now <= 360  # 5m ± 20 %

    run(tmp_path, scenario)


def test_permanent_failure_bounces_once_and_the_bounce_never_bounces(tmp_path: Path) -> None:
    async def scenario(queue: Queue) -> None:
        queue.courier.outcome = NEVER  # refuses the message, and then the DSN too
        record_id = await queue.put("u@example.net")
        await queue.until(lambda: len(queue.courier.delivered) == 2 and not queue.scheduler.records)
        original, notice = queue.courier.delivered
        assert (original.queue_id, original.sender) == (record_id, "app@example.com")
        assert (notice.sender, notice.recipients) == ("", ["app@example.com"])
        await asyncio.sleep(0.2)
        assert len(queue.courier.delivered) == 2 and not queue.scheduler.records

    run(tmp_path, scenario)


def test_delete_during_a_round_waits_for_the_round(tmp_path: Path) -> None:
    async def scenario(queue: Queue) -> None:
        queue.courier.gate = asyncio.Event()
        queue.courier.outcome = LATER
        record_id = await queue.put("u@example.net")
        await asyncio.wait_for(queue.courier.started.wait(), 5)
        answer = await Operator(queue.scheduler).act("delete", [record_id])
        assert answer == {record_id: "will be done when the current delivery attempt ends"}
        assert record_id in queue.scheduler.records  # not yet: the attempt is still out
        queue.courier.gate.set()
        await queue.until(lambda: record_id not in queue.scheduler.records)
        assert not on_disk(queue.spool, INCOMING, record_id) and not on_disk(queue.spool, DEFERRED, record_id)

    run(tmp_path, scenario)


def test_hold_during_a_round_holds_after_it(tmp_path: Path) -> None:
    async def scenario(queue: Queue) -> None:
        queue.courier.gate = asyncio.Event()
        queue.courier.outcome = LATER
        record_id = await queue.put("u@example.net")
        await asyncio.wait_for(queue.courier.started.wait(), 5)
        operator = Operator(queue.scheduler)
        assert (await operator.act("flush", [record_id]))[record_id] == "being delivered now"
        await operator.act("hold", [record_id])
        queue.courier.gate.set()
        # The file is renamed into hold/ a moment before the save returns to the scheduler.
        await queue.until(lambda: on_disk(queue.spool, HOLD, record_id)
                          and queue.scheduler.records[record_id].state == HOLD)
        assert queue.scheduler.records[record_id].state == HOLD
        assert (await operator.act("release", [record_id]))[record_id] == "ok"
        assert on_disk(queue.spool, DEFERRED, record_id)

    run(tmp_path, scenario)


def test_spool_error_after_an_attempt_keeps_the_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario(queue: Queue) -> None:
        queue.courier.gate = asyncio.Event()
        queue.courier.outcome = LATER
        record_id = await queue.put("u@example.net")
        await asyncio.wait_for(queue.courier.started.wait(), 5)

        async def failing_save(record: object, state: str | None = None) -> object:
            raise SpoolError("disk on fire")

        monkeypatch.setattr(queue.spool, "save", failing_save)
        queue.courier.gate.set()
        await queue.until(lambda: queue.scheduler.records[record_id].attempts == 1
                          and record_id not in queue.scheduler.active)
        # In memory, due again after retry_initial; on disk, its last durable state.
        assert queue.scheduler.records[record_id].next_attempt == queue.clock.now + 300
        assert on_disk(queue.spool, INCOMING, record_id)

    run(tmp_path, scenario)


def test_expired_recipients_bounce_at_the_last_attempt(tmp_path: Path) -> None:
    async def scenario(queue: Queue) -> None:
        queue.courier.outcome = LATER
        record_id = await queue.put("u@example.net", "v@example.net")
        await queue.until(lambda: on_disk(queue.spool, DEFERRED, record_id))
        record = queue.scheduler.records[record_id]
        # One last attempt at expiry: the retry is never scheduled past it.
        queue.clock.now = record.expires + 1
        await Operator(queue.scheduler).act("flush", [record_id])
        await queue.until(lambda: record_id not in queue.scheduler.records)
        assert [r.state for r in record.recipients] == [FAILED, FAILED]
        assert all(r.last_reply and r.last_reply.startswith("4.4.7 message expired") for r in record.recipients)
        # The DSN went to the original sender with the null sender.
        await queue.until(lambda: any(p.sender == "" for p in queue.courier.delivered))
        [notice] = [p for p in queue.courier.delivered if p.sender == ""]
        assert notice.recipients == ["app@example.com"]

    run(tmp_path, scenario)


def test_unreachable_hop_defers_everything_waiting_for_it(tmp_path: Path) -> None:
    async def scenario(queue: Queue) -> None:
        queue.courier.outcome = result.transient(451, "4.4.1", "no mail exchanger answered")
        queue.courier.reached = False
        first = await queue.put("u@example.net")
        second = await queue.put("w@example.net")
        await queue.until(lambda: on_disk(queue.spool, DEFERRED, first) and on_disk(queue.spool, DEFERRED, second))
        for record_id in (first, second):
            assert queue.scheduler.records[record_id].recipients[0].last_reply == "451 4.4.1 no mail exchanger answered"

    run(tmp_path, scenario)
