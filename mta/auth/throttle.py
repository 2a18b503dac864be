"""Brute-force throttling of AUTH across connections, processes and pods.

Failures are counted per client IP and per user name over a sliding window,
in the limits store (``mta.limits``: this process, or the Redis every pod
shares, so a guesser who spreads over the pods behind a Service gets one
budget, not one per pod).  Past ``max_failures`` in the window the source
is locked out until its oldest failure leaves the window.  Memory is
bounded: at most ``max_failures`` failures are kept per source, and the
store in this process keeps a bounded number of sources.  While a shared
store is unreachable each pod allows its share of ``max_failures``.

Failure: none; it only counts (the store's fallback answers when Redis does not).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from mta.limits.store import LimitsStore, LocalStore


class Throttle:
    def __init__(self, max_failures: int, window: float, clock: Callable[[], float] = time.monotonic,
                 store: LimitsStore | None = None) -> None:
        self.max_failures = max_failures
        self.window = window
        self.store: LimitsStore = store or LocalStore(clock)

    @staticmethod
    def _key(key: str) -> str:
        return f"auth:{key}"

    async def failures(self, key: str) -> int:
        """Failures of ``key`` in the window (at most ``max_failures`` are kept)."""
        return await self.store.count(self._key(key), self.window)

    def limit(self) -> int:
        """The failures that lock a source out, as this pod may allow them now."""
        return self.store.share(self.max_failures)

    async def blocked(self, key: str) -> bool:
        return await self.failures(key) >= self.limit()

    async def fail(self, key: str) -> None:
        # More than max_failures tell nothing more: "blocked" asks for at least that many.
        await self.store.take(self._key(key), self.max_failures, self.window)

    async def succeed(self, key: str) -> None:
        await self.store.clear(self._key(key))
