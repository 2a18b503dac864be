"""The limits store in Redis (or Valkey), shared by every pod and process.

Each operation is one Lua script (``EVALSHA``), so it is atomic and costs one
round trip.  Time is the Redis server's (``TIME``), not each pod's: pods
whose clocks disagree still agree on who holds a lease and what left a
window.  Keys are ``<prefix>:<kind>:<key>`` and every one carries an expiry,
so nothing outlives its use:

- a lease is a sorted set of holders scored by their expiry;
- a rate is a sorted set of events scored by their time (the member is
  unique per event; an event of weight w is w members);
- a counter is a plain integer with ``EXPIRE`` set at its creation.

Connection: a URL (``redis://``, ``rediss://`` for TLS with ``ca_file``,
``unix://``), a password read from a file (a mounted Secret), and a timeout
on every command, so a store that hangs costs at most that long.

Failure: ``LimitsStoreError`` for anything the store does not answer
(unreachable, timed out, authentication refused, a script error); callers
(``mta.limits.fallback``) fall back to counting locally.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from mta.limits.store import LimitsStoreError

T = TypeVar("T")

_NOW = "local t = redis.call('TIME') local now = tonumber(t[1]) + tonumber(t[2]) / 1e6 "

# KEYS[1] lease set; ARGV: holder, limit, ttl seconds.  1: held, 0: full.
LEASE = _NOW + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
  redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3]) * 1000))
  return 1
end
return 0
"""

# KEYS[1] event set; ARGV: limit, window seconds, unique member, weight (that many members).
# "0" or the wait, as a string (a Lua number would come back as an integer).
TAKE = _NOW + """
local window = tonumber(ARGV[2])
local weight = tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) + weight <= tonumber(ARGV[1]) then
  for i = 1, weight do redis.call('ZADD', KEYS[1], now, ARGV[3] .. ':' .. i) end
  redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000))
  return '0'
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return tostring(math.max(tonumber(oldest[2]) + window - now, 0.001))
"""

# KEYS[1] event set; ARGV: window seconds.  The events in the window.
COUNT = _NOW + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]))
return redis.call('ZCARD', KEYS[1])
"""

# KEYS[1] counter; ARGV: amount, ttl seconds.  The new value.
ADD = """
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
if value == tonumber(ARGV[1]) then redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) * 1000)) end
return value
"""


class RedisStore:
    def __init__(self, url: str, *, password_file: Path | None = None, ca_file: Path | None = None,
                 prefix: str = "kubemta", timeout: float = 0.5) -> None:
        options: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout,
                                   "retry_on_timeout": False}
        if password_file is not None:
            options["password"] = password_file.read_text().strip()
        if ca_file is not None:
            options["ssl_ca_certs"] = str(ca_file)
        self.url = url
        self.prefix = prefix
        self.client = aioredis.Redis.from_url(url, **options)
        self._lease = self.client.register_script(LEASE)
        self._take = self.client.register_script(TAKE)
        self._add = self.client.register_script(ADD)
        self._count = self.client.register_script(COUNT)
        # Rate events need unique members: this client and a sequence number.
        self._events = itertools.count()
        self._me = f"{os.uname().nodename}:{os.getpid()}:{secrets.token_hex(4)}"

    def _key(self, kind: str, key: str) -> str:
        return f"{self.prefix}:{kind}:{key}"

    async def _call(self, operation: Callable[[], Awaitable[T]]) -> T:
        try:
            return await operation()
        except (RedisError, OSError, TimeoutError) as exc:
            raise LimitsStoreError(f"{self.url}: {exc.__class__.__name__}: {exc}") from exc

    async def ping(self) -> None:
        await self._call(lambda: self.client.ping())

    async def lease(self, key: str, holder: str, limit: int, ttl: float) -> bool:
        keys, args = [self._key("lease", key)], [holder, limit, ttl]
        return bool(await self._call(lambda: self._lease(keys=keys, args=args)))

    async def release(self, key: str, holder: str) -> None:
        await self._call(lambda: self.client.zrem(self._key("lease", key), holder))

    async def take(self, key: str, limit: int, window: float, weight: int = 1) -> float:
        member = f"{self._me}:{next(self._events)}"
        keys, args = [self._key("rate", key)], [limit, window, member, weight]
        return float(await self._call(lambda: self._take(keys=keys, args=args)))

    async def count(self, key: str, window: float) -> int:
        keys, args = [self._key("rate", key)], [window]
        return int(await self._call(lambda: self._count(keys=keys, args=args)))

    async def clear(self, key: str) -> None:
        await self._call(lambda: self.client.delete(self._key("rate", key)))

    async def add(self, key: str, ttl: float, amount: int = 1) -> int:
        keys, args = [self._key("count", key)], [amount, ttl]
        return int(await self._call(lambda: self._add(keys=keys, args=args)))

    async def get(self, key: str) -> int:
        value = await self._call(lambda: self.client.get(self._key("count", key)))
        return int(value or 0)

    async def close(self) -> None:
        with contextlib.suppress(RedisError, OSError):  # nothing left to give back
            await self.client.aclose()
