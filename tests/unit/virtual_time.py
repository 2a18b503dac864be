"""An event loop whose clock jumps ahead whenever nothing is ready to run.

Timers (``asyncio.sleep``, ``wait_for`` deadlines, ``call_later``) run on a
virtual clock: when the loop has nothing to do but wait for the next timer,
it waits a short real moment for I/O (the spool's commit thread answers
through the loop's self-pipe) and, if none comes, moves the clock straight
to that timer.  A scheduler's two-second idle timeout then costs no real
time, and every interleaving of timers with the test's own steps is the
same on every run, however loaded the machine is.

Failure: none of its own; a test that waits for something that never
happens still needs a bound (``asyncio.timeout`` in virtual seconds).
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine
from typing import Any

# How long an idle loop waits in real time for I/O before it jumps: long
# enough for a commit round under load, short enough for many jumps a test.
REAL_GRACE = 0.05


class _JumpingSelector(selectors.DefaultSelector):
    def __init__(self) -> None:
        super().__init__()
        self.loop: VirtualTimeLoop | None = None

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is not None and timeout <= 0:
            return super().select(0)
        events = super().select(REAL_GRACE)
        if not events and timeout is not None and self.loop is not None:
            self.loop.now += timeout
        return events


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        selector = _JumpingSelector()
        super().__init__(selector)
        selector.loop = self
        self.now = 0.0

    def time(self) -> float:
        return self.now


def run_virtual(main: Coroutine[Any, Any, Any]) -> Any:
    """``asyncio.run`` on a ``VirtualTimeLoop``."""
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(main)
