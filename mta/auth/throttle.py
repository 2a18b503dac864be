"""Brute-force throttling of AUTH across connections.

Failures are counted per client IP and per user name over a sliding window.
Past ``max_failures`` in the window the source is locked out until its
oldest failure leaves the window.  Memory is bounded: only the most recent
``MAX_KEYS`` sources are remembered.  Failure: none; it only counts.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable

MAX_KEYS = 100_000


class Throttle:
    def __init__(self, max_failures: int, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures = max_failures
        self.window = window
        self.clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, key: str) -> deque[float]:
        stamps = self._failures.get(key)
        if stamps is None:
            return deque()
        cutoff = self.clock() - self.window
        while stamps and stamps[0] < cutoff:
            stamps.popleft()
        if not stamps:
            del self._failures[key]
        return stamps

    def blocked(self, key: str) -> bool:
        return len(self._recent(key)) >= self.max_failures

    def fail(self, key: str) -> None:
        stamps = self._failures.setdefault(key, deque())
        self._failures.move_to_end(key)
        stamps.append(self.clock())
        while len(stamps) > self.max_failures:
            stamps.popleft()
        while len(self._failures) > MAX_KEYS:
            self._failures.popitem(last=False)

    def succeed(self, key: str) -> None:
        self._failures.pop(key, None)
