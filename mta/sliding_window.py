"""A sliding-window counter: the events of the last ``span`` seconds, and their weight.

The one counter behind the AUTH throttle (failures per source), account
rates (messages a minute, recipients a day) and traffic shaping (messages
a minute per destination).  Callers keep one window per key and pass the
clock reading (``now``) in, so each keeps its own clock and tests use
plain numbers.  An event at ``t`` counts while ``now - t <= span``.

Memory: one timestamp per event still in the window (a weight as well,
once any event weighed other than 1); ``max_events`` bounds it further by
forgetting the oldest events, for callers that only ask "at least N?".

Failure: none.  A clock that steps backwards only keeps events longer.
"""

from __future__ import annotations

from collections import deque


class SlidingWindow:
    __slots__ = ("_times", "_total", "_weights", "max_events", "span")

    def __init__(self, span: float, max_events: int | None = None) -> None:
        self.span = span
        self.max_events = max_events
        self._times: deque[float] = deque()
        # Created on the first weight other than 1: most windows only count.
        self._weights: deque[int] | None = None
        self._total = 0

    def add(self, now: float, weight: int = 1) -> None:
        """One event at ``now`` weighing ``weight``."""
        self._expire(now)
        if weight != 1 and self._weights is None:
            self._weights = deque([1] * len(self._times))
        self._times.append(now)
        if self._weights is not None:
            self._weights.append(weight)
        self._total += weight
        if self.max_events is not None:
            while len(self._times) > self.max_events:
                self._drop_oldest()

    def count(self, now: float) -> int:
        """Events in the window."""
        self._expire(now)
        return len(self._times)

    def total(self, now: float) -> int:
        """The sum of the weights of the events in the window."""
        self._expire(now)
        return self._total

    def oldest_leaves_in(self, now: float) -> float:
        """Seconds until the oldest event leaves the window (0 when it is empty)."""
        self._expire(now)
        if not self._times:
            return 0.0
        return max(0.0, self._times[0] + self.span - now)

    def _expire(self, now: float) -> None:
        cutoff = now - self.span
        while self._times and self._times[0] < cutoff:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        self._times.popleft()
        self._total -= self._weights.popleft() if self._weights is not None else 1
