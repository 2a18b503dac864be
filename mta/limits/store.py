"""The limits store: leases, sliding-window rates and day counters, by key.

Three kinds of counter express every shared limit:

- a **lease** (``lease``/``release``): one of at most ``limit`` slots under a
  key, held by a named holder for ``ttl`` seconds and renewed by asking
  again; a holder that dies stops renewing, and its slot comes back when
  the ttl runs out (a delivery connection: ``mta.scheduler.shaping``);
- a **rate** (``take``): at most ``limit`` events in any ``window`` seconds;
  ``take`` counts one (or ``weight``) and answers 0, or counts nothing and
  answers how long until the oldest leaves the window (messages a minute
  per destination; an account's recipients a day, weighted by message);
- a **counter** (``add``/``get``): a number that lives ``ttl`` seconds from its
  first increment (messages a day from one egress address).

A rate's events can also be counted without adding one (``count``) and
forgotten (``clear``): AUTH failures per client address and per user name.
In this process at most ``MAX_RATES`` rates are kept, the least recently
used forgotten first, so a flood of client addresses cannot grow memory.

``LocalStore`` keeps them in this process, with the same semantics as the
shared store (``mta.limits.redis_store``), so a single pod needs nothing
else.  Every operation is a coroutine because the shared one goes over the
network.

Failure: ``LocalStore`` never fails.  A shared store raises
``LimitsStoreError`` when it cannot answer; ``mta.limits.fallback`` turns that
into local counting.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from mta.sliding_window import SlidingWindow

MAX_RATES = 100_000


class LimitsStoreError(Exception):
    """The shared store did not answer (unreachable, timed out, refused the command)."""


class LimitsStore(Protocol):
    async def lease(self, key: str, holder: str, limit: int, ttl: float) -> bool:
        """Take or renew ``holder``'s slot under ``key``; False when all ``limit`` are held by others."""

    async def release(self, key: str, holder: str) -> None:
        """Give ``holder``'s slot back (nothing when it holds none)."""

    async def take(self, key: str, limit: int, window: float, weight: int = 1) -> float:
        """Count ``weight`` events when that leaves at most ``limit`` in the last
        ``window`` seconds and answer 0; otherwise count nothing and answer
        the seconds until the oldest leaves the window."""

    async def count(self, key: str, window: float) -> int:
        """The events of the last ``window`` seconds under ``key``."""

    async def clear(self, key: str) -> None:
        """Forget every event under ``key``."""

    async def add(self, key: str, ttl: float, amount: int = 1) -> int:
        """Add ``amount`` to a counter that lives ``ttl`` seconds from its creation; its new value."""

    async def get(self, key: str) -> int:
        """A counter's value (0 when it does not exist or has expired)."""

    def share(self, limit: int) -> int:
        """The part of ``limit`` this process may use now (all of it, but while a shared store is away)."""

    async def close(self) -> None:
        """Let go of connections."""


class LocalStore:
    """The limits of one process, in its memory."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._leases: dict[str, dict[str, float]] = {}  # key -> holder -> expiry
        self._rates: OrderedDict[str, SlidingWindow] = OrderedDict()
        self._counters: dict[str, tuple[int, float]] = {}  # key -> (value, expiry)

    async def lease(self, key: str, holder: str, limit: int, ttl: float) -> bool:
        now = self.clock()
        holders = self._leases.setdefault(key, {})
        for name in [name for name, expiry in holders.items() if expiry <= now]:
            del holders[name]
        if holder not in holders and len(holders) >= limit:
            return False
        holders[holder] = now + ttl
        return True

    async def release(self, key: str, holder: str) -> None:
        holders = self._leases.get(key)
        if holders is not None:
            holders.pop(holder, None)
            if not holders:
                del self._leases[key]

    async def take(self, key: str, limit: int, window: float, weight: int = 1) -> float:
        now = self.clock()
        events = self._rates.get(key)
        if events is None or events.span != window:
            events = self._rates[key] = SlidingWindow(window, max_events=limit)
            while len(self._rates) > MAX_RATES:
                self._rates.popitem(last=False)
        self._rates.move_to_end(key)
        if events.total(now) + weight <= limit:
            events.add(now, weight)
            return 0.0
        return max(events.oldest_leaves_in(now), 1e-3)

    async def count(self, key: str, window: float) -> int:
        events = self._rates.get(key)
        if events is None:
            return 0
        found = events.total(self.clock())
        if not found:
            del self._rates[key]
        return found

    async def clear(self, key: str) -> None:
        self._rates.pop(key, None)

    async def add(self, key: str, ttl: float, amount: int = 1) -> int:
        now = self.clock()
        value, expiry = self._counters.get(key, (0, now + ttl))
        if expiry <= now:
            value, expiry = 0, now + ttl
        self._counters[key] = (value + amount, expiry)
        return value + amount

    async def get(self, key: str) -> int:
        value, expiry = self._counters.get(key, (0, 0.0))
        return value if expiry > self.clock() else 0

    def share(self, limit: int) -> int:
        return limit

    async def close(self) -> None:
        return None
