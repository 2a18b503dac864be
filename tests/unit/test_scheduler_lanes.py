"""Delivery lanes under the scheduler's own timers, on a virtual clock.

The lanes' idle timeout and the global delivery slots are about timing, so
these tests run on ``VirtualTimeLoop``: every timer fires at the same point
relative to the test's own steps on every run, and waiting out an idle
connection costs no real time.  The courier is the tests' own
(``TestCourier``); the spool, intake and bouncer are real.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mta.intake import Envelope, Intake
from mta.scheduler import queue as scheduler_queue
from tests.unit.test_scheduler import running_queue
from tests.unit.virtual_time import run_virtual


async def until_virtual(condition: object, timeout: float) -> bool:
    """Poll ``condition`` every tenth of a virtual second; False if it still fails after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():  # type: ignore[operator]
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.1)
    return True


@pytest.mark.parametrize("steps", range(8))
def test_mail_arriving_as_an_idle_lane_times_out_is_delivered(tmp_path: Path, steps: int) -> None:
    """The last message for a domain, queued while that domain's lane gives up waiting, is still sent.

    The lane's idle wait ends at a known virtual time; the second message is
    announced ``steps`` turns of the loop after it, which sweeps every point
    of the lane's way out (the timeout firing, its cancellation, the lane's
    exit).  Before the fix one of them left the message active with no lane.
    """
    async def main() -> None:
        async with running_queue(tmp_path) as queue:
            loop = asyncio.get_running_loop()
            # Stored but not yet announced: the test chooses the moment.
            unannounced = Intake(queue.spool, lambda record: None, 3600, clock=queue.clock)
            late = await unannounced.put(Envelope("app@example.com", ["v@example.net"]), b"Subject: t\r\n\r\nb\r\n")
            first = await queue.put("u@example.net")
            assert await until_virtual(lambda: len(queue.courier.delivered) == 1, 10)
            idle_ends = queue.courier.finished_at[0] + scheduler_queue.IDLE_CONNECTION
            announced = asyncio.Event()

            def announce(turns_left: int) -> None:
                # From the loop's own callbacks, so that each step is exactly one turn.
                if turns_left:
                    loop.call_soon(announce, turns_left - 1)
                    return
                queue.scheduler.accept(late)
                announced.set()

            loop.call_at(idle_ends, announce, steps)
            await announced.wait()
            delivered = await until_virtual(lambda: late.id not in queue.scheduler.records, 60)
            assert delivered, f"{late.id} stranded: active={late.id in queue.scheduler.active}"
            assert [p.queue_id for p in queue.courier.delivered] == [first, late.id]

    run_virtual(main())


def test_no_destination_waits_behind_an_idle_connection(tmp_path: Path) -> None:
    """Six destinations, two slots: the four that find the slots taken get them as soon as a delivery ends.

    Before, each of the first two lanes kept its slot for ``IDLE_CONNECTION``
    after its delivery, waiting for more mail for its own hop.
    """
    async def main() -> None:
        async with running_queue(tmp_path, {"max_concurrency": 2}) as queue:
            loop = asyncio.get_running_loop()
            queue.courier.duration = 0.1
            domains = [f"d{n}.example" for n in range(6)]
            started = loop.time()
            for domain in domains:
                await queue.put(f"u@{domain}")
            assert await until_virtual(lambda: len(queue.courier.delivered) == 6, 30)
            took = max(queue.courier.finished_at) - started
            # Three rounds of two 0.1 s deliveries, not idle timeouts in between.
            assert took < 1.0 < scheduler_queue.IDLE_CONNECTION, took
            assert queue.courier.peak == 2  # the limit itself holds
            # The idle connections that gave way were closed (none kept for their hop).
            assert {hop for hop, keep in queue.courier.released if keep == 0} >= {"d0.example", "d1.example"}

    run_virtual(main())


def test_an_idle_connection_is_kept_while_no_one_waits(tmp_path: Path) -> None:
    """A message for the same hop a second after the last one reuses the idle lane (one lane, no release)."""
    async def main() -> None:
        async with running_queue(tmp_path, {"max_concurrency": 2}) as queue:
            await queue.put("u@example.net")
            assert await until_virtual(lambda: len(queue.courier.delivered) == 1, 10)
            loop = asyncio.get_running_loop()
            await asyncio.sleep(queue.courier.finished_at[0] + 1.0 - loop.time())
            assert queue.courier.released == []  # still idle, connection kept
            await queue.put("v@example.net")
            assert await until_virtual(lambda: len(queue.courier.delivered) == 2, 10)
            gap = queue.courier.finished_at[1] - queue.courier.finished_at[0]
            assert gap < scheduler_queue.IDLE_CONNECTION
            assert queue.courier.released == []  # the same lane took it

    run_virtual(main())
