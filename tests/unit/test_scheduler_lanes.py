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
    """Poll ``condition`` once a virtual second; False if it still fails after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():  # type: ignore[operator]
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(1.0)
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
