"""Brute-force throttling of AUTH across connections.

Failures are counted per client IP and per user name over a sliding window
(``mta.sliding_window``).  Past ``max_failures`` in the window the source
is locked out until its oldest failure leaves the window.  Memory is
bounded: only the most recent ``MAX_KEYS`` sources are remembered, each
with at most ``max_failures`` failures.  Failure: none; it only counts.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from mta.sliding_window import SlidingWindow

MAX_KEYS = 100_000


class Throttle:
    def __init__(self, max_failures: int, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures = max_failures
        self.window = window
        self.clock = clock
        self._failures: OrderedDict[str, SlidingWindow] = OrderedDict()

    def _recent(self, key: str) -> int:
        failures = self._failures.get(key)
        if failures is None:
            return 0
        count = failures.count(self.clock())
        if not count:
            del self._failures[key]
        return count

    def failures(self, key: str) -> int:
        """Failures of ``key`` in the window (at most ``max_failures`` are kept)."""
        return self._recent(key)

    def blocked(self, key: str) -> bool:
        return self._recent(key) >= self.max_failures

    def fail(self, key: str) -> None:
        failures = self._failures.get(key)
        if failures is None:
            # More than max_failures tell nothing more: "blocked" asks for at least that many.
            failures = self._failures[key] = SlidingWindow(self.window, max_events=self.max_failures)
        self._failures.move_to_end(key)
        failures.add(self.clock())
        while len(self._failures) > MAX_KEYS:
            self._failures.popitem(last=False)

    def succeed(self, key: str) -> None:
        self._failures.pop(key, None)
