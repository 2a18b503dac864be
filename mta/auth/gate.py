"""The AUTH gate: who may try a password now, one check at a time per user.

Brute force is counted by ``mta.auth.throttle`` (failures per client IP and
per user name).  The gate makes those counts hold under parallel clients:

- attempts **in flight** from one client count with its failures, so sixty
  parallel guesses from one address get at most ``max_failures`` checks;
- checks for one user name run **one at a time**, so each sees the failures
  of the one before it;
- scrypt runs in a **small pool of its own** (each check holds 32 MiB; the
  event loop's default executor also serves spool reads);
- a user locked out by failures is locked out **for the clients that
  failed**: a client address with no failure in the window may still try,
  so an attacker cannot lock the real user out of their own logins
  (one check at a time per user and the failure delay bound its guesses).

``unlock`` (``mta user unlock``) forgets a user's failures and those of
the addresses that failed as that user (the last ``UNLOCK_ADDRESSES``
of them), or of one address only.

Failure: none; it answers yes or no.  ``verify`` propagates what the
credentials' check raises.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

from mta.auth.throttle import Throttle

CHECK_THREADS = 2  # scrypt checks at once, in all: bounded memory whatever the load
UNLOCK_ADDRESSES = 64  # addresses remembered per user name, to unlock them with it
UNLOCK_USERS = 10_000  # user names remembered, like the throttle's own bound on keys


class AuthGate:
    def __init__(self, throttle: Throttle, threads: int = CHECK_THREADS) -> None:
        self.throttle = throttle
        self._in_flight: Counter[str] = Counter()
        self._user_locks: dict[str, asyncio.Lock] = {}
        self._checks: Counter[str] = Counter()  # running or waiting, per user
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="auth-check")
        # Which addresses failed as which user: an unlock of the user clears them too.
        self._failed_from: OrderedDict[str, OrderedDict[str, None]] = OrderedDict()

    async def client_locked(self, ip: str) -> bool:
        """Too many failures, counting the attempts still running here, from this client."""
        return await self.throttle.failures(f"ip:{ip}") + self._in_flight[ip] >= self.throttle.limit()

    async def user_locked(self, user: str, ip: str) -> bool:
        return await self.throttle.blocked(f"user:{user}") and await self.throttle.failures(f"ip:{ip}") > 0

    @contextlib.asynccontextmanager
    async def attempt(self, ip: str) -> AsyncIterator[None]:
        self._in_flight[ip] += 1
        try:
            yield
        finally:
            self._in_flight[ip] -= 1
            if not self._in_flight[ip]:
                del self._in_flight[ip]

    @contextlib.asynccontextmanager
    async def checking(self, user: str) -> AsyncIterator[None]:
        lock = self._user_locks.setdefault(user, asyncio.Lock())
        self._checks[user] += 1
        try:
            async with lock:
                yield
        finally:
            self._checks[user] -= 1
            if not self._checks[user]:  # keep locks only for users with checks running or waiting
                del self._checks[user]
                del self._user_locks[user]

    async def verify(self, check: Callable[[str, str], bool], user: str, password: str) -> bool:
        return await asyncio.get_running_loop().run_in_executor(self._pool, check, user, password)

    async def failed(self, user: str, ip: str) -> None:
        await self.throttle.fail(f"ip:{ip}")
        await self.throttle.fail(f"user:{user}")
        addresses = self._failed_from.setdefault(user, OrderedDict())
        self._failed_from.move_to_end(user)
        addresses[ip] = None
        addresses.move_to_end(ip)
        while len(addresses) > UNLOCK_ADDRESSES:
            addresses.popitem(last=False)
        while len(self._failed_from) > UNLOCK_USERS:
            self._failed_from.popitem(last=False)

    async def unlock(self, user: str, ip: str | None = None) -> dict[str, object]:
        """Clear a lockout: ``ip`` only, or the user and every address that failed as it
        (those that failed through this pod: a shared store's others are cleared with ``ip``).

        Says what was locked before: the user's failures and the addresses cleared."""
        was_locked = await self.throttle.blocked(f"user:{user}")
        if ip is not None:
            cleared = [ip] if await self.throttle.failures(f"ip:{ip}") else []
            await self.throttle.succeed(f"ip:{ip}")
            addresses = self._failed_from.get(user)
            if addresses is not None:
                addresses.pop(ip, None)
            return {"user": user, "user_locked": was_locked, "addresses": cleared}
        cleared = [a for a in self._failed_from.pop(user, {}) if await self.throttle.failures(f"ip:{a}")]
        await self.throttle.succeed(f"user:{user}")
        for address in cleared:
            await self.throttle.succeed(f"ip:{address}")
        return {"user": user, "user_locked": was_locked, "addresses": cleared}

    async def succeeded(self, user: str, ip: str) -> None:
        await self.throttle.succeed(f"ip:{ip}")
        await self.throttle.succeed(f"user:{user}")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
