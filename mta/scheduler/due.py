"""When each queued message is next due: a heap of (next attempt, queue id).

The scheduler pushes an entry whenever a record's next attempt is set and
pops what is due; an entry goes stale when the record moved on since (it
was rescheduled, held, removed or is in a round), and the caller says which
entries still stand, so nothing has to be found and removed from the heap.

Failure: none.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator


class DueTimes:
    def __init__(self) -> None:
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, due: float, record_id: str) -> None:
        heapq.heappush(self._heap, (due, record_id))

    def pop_due(self, now: float, stands: Callable[[str, float], bool]) -> Iterator[str]:
        """The ids due by ``now`` whose entry ``stands(id, due)``, earliest first; stale entries are dropped.

        Lazy: the caller may stop taking (delivery paused) and the rest stay queued.
        """
        while self._heap and self._heap[0][0] <= now:
            due, record_id = heapq.heappop(self._heap)
            if stands(record_id, due):
                yield record_id

    def wait(self, now: float, longest: float) -> float:
        """Seconds until the earliest entry is due, at most ``longest``."""
        return max(0.0, min(longest, self._heap[0][0] - now)) if self._heap else longest
