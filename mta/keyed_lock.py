"""One ``asyncio.Lock`` per key, kept only while someone holds or waits for it.

The HTTP API serialises requests that share an Idempotency-Key (a retry
waits for the first answer) and requests that share an API key (one scrypt
check serves them all).  Both need a lock per key without keeping a lock
for every key ever seen: a lock lives while its count of holders and
waiters is above zero, so memory is bounded by the requests in flight.

Failure: none of its own; a cancelled waiter leaves the count right.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Hashable


class KeyedLock:
    def __init__(self) -> None:
        self._locks: dict[Hashable, asyncio.Lock] = {}
        self._users: dict[Hashable, int] = {}

    def __len__(self) -> int:
        return len(self._locks)

    @contextlib.asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._users[key] = self._users.get(key, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._users[key] -= 1
            if not self._users[key]:
                del self._users[key], self._locks[key]
