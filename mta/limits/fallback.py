"""A shared limits store that never stops mail: local counting while it is unreachable.

``FallbackStore`` sends every operation to the shared store.  When one
fails (``LimitsStoreError``) it logs ``limits_store_down`` once, answers from
a ``LocalStore`` with every limit divided by the number of replicas — the
pods together then stay within the limit while none of them can see the
others — and asks the shared store again after ``retry`` seconds; the first
answer from it logs ``limits_store_up``.  Leases the shared store granted
are kept locally as well, so that when it goes away a pod's share counts
the connections it already has open.  Counters (the daily cap) are
divided the same way by the callers' limits (``share``).  What was counted
locally while the store was away is not carried over: the limits are
approximate across an outage, never a reason to refuse or lose mail.

``open_store`` builds the store ``limits.store`` configures.

Failure: none; every operation answers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from mta.config import LimitsStoreConfig
from mta.limits.redis_store import RedisStore
from mta.limits.store import LimitsStore, LimitsStoreError, LocalStore
from mta.obs.log import event

T = TypeVar("T")
UNLIMITED = 1 << 30


class FallbackStore:
    def __init__(self, shared: RedisStore, replicas: int, retry: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.shared = shared
        self.replicas = max(1, replicas)
        self.retry = retry
        self.clock = clock
        self.local = LocalStore(clock)
        self.up = True
        self._next_try = 0.0

    def share(self, limit: int) -> int:
        """``limit`` as this pod may use it now: whole while the store is up, its share while it is not."""
        return limit if self.up else max(1, limit // self.replicas)

    async def _either(self, shared: Callable[[], Awaitable[T]], local: Callable[[], Awaitable[T]]) -> T:
        if not self.up and self.clock() < self._next_try:
            return await local()
        try:
            answer = await shared()
        except LimitsStoreError as exc:
            if self.up:
                event("limits_store_down", level=logging.WARNING, store=self.shared.url, error=str(exc),
                      replicas=self.replicas)
            self.up = False
            self._next_try = self.clock() + self.retry
            return await local()
        if not self.up:
            self.up = True
            event("limits_store_up", store=self.shared.url)
        return answer

    async def lease(self, key: str, holder: str, limit: int, ttl: float) -> bool:
        async def shared() -> bool:
            held = await self.shared.lease(key, holder, limit, ttl)
            if held:  # kept here too: an outage then starts from the slots this pod holds
                await self.local.lease(key, holder, UNLIMITED, ttl)
            return held
        return await self._either(shared, lambda: self.local.lease(key, holder, self.share(limit), ttl))

    async def release(self, key: str, holder: str) -> None:
        await self.local.release(key, holder)  # the mirror, or the slot itself while Redis is away
        await self._either(lambda: self.shared.release(key, holder), _nothing)

    async def take(self, key: str, limit: int, window: float, weight: int = 1) -> float:
        return await self._either(lambda: self.shared.take(key, limit, window, weight),
                                  lambda: self.local.take(key, self.share(limit), window, weight))

    async def count(self, key: str, window: float) -> int:
        return await self._either(lambda: self.shared.count(key, window), lambda: self.local.count(key, window))

    async def clear(self, key: str) -> None:
        await self.local.clear(key)
        await self._either(lambda: self.shared.clear(key), _nothing)

    async def add(self, key: str, ttl: float, amount: int = 1) -> int:
        return await self._either(lambda: self.shared.add(key, ttl, amount),
                                  lambda: self.local.add(key, ttl, amount))

    async def get(self, key: str) -> int:
        return await self._either(lambda: self.shared.get(key), lambda: self.local.get(key))

    async def close(self) -> None:
        await self.shared.close()


async def _nothing() -> None:
    return None


def open_store(config: LimitsStoreConfig, replicas: int) -> LimitsStore:
    """The store ``limits.store`` names: in this process without a url, else the shared one with its fallback."""
    if config.url is None:
        return LocalStore()
    shared = RedisStore(config.url, password_file=config.password_file, ca_file=config.ca_file,
                        prefix=config.key_prefix, timeout=config.timeout)
    return FallbackStore(shared, config.replicas or replicas, config.retry)
