"""The limits store's three counters, in this process and in a real Redis,
with the same answers from both; and the fallback when Redis goes away."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from mta.limits.fallback import FallbackStore
from mta.limits.redis_store import RedisStore
from mta.limits.store import LimitsStore, LimitsStoreError, LocalStore
from mta.obs import log as obs_log
from tests.peers.redis import RedisServer


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", password="s3cret-for-tests")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def redis_store(server: RedisServer, tmp_path: Path, **options: object) -> RedisStore:
    secret = tmp_path / "redis-password"
    secret.write_text(f"{server.password}\n")
    return RedisStore(server.url, password_file=secret, **options)  # type: ignore[arg-type]


async def both(server: RedisServer, tmp_path: Path) -> AsyncIterator[LimitsStore]:
    for store in (LocalStore(), redis_store(server, tmp_path, prefix=f"t{time.monotonic_ns()}")):
        try:
            yield store
        finally:
            await store.close()


def test_leases_are_limited_renewed_released_and_expire(redis_server: RedisServer, tmp_path: Path) -> None:
    async def scenario() -> None:
        async for store in both(redis_server, tmp_path):
            name = type(store).__name__
            assert await store.lease("conn:dest", "a", 2, 0.5), name
            assert await store.lease("conn:dest", "b", 2, 0.5), name
            assert not await store.lease("conn:dest", "c", 2, 0.5), f"{name}: a third holder of two slots"
            assert await store.lease("conn:dest", "a", 2, 0.5), f"{name}: a holder renews its own slot"
            assert await store.lease("conn:other", "c", 2, 0.5), f"{name}: another key, other slots"
            await store.release("conn:dest", "b")
            assert await store.lease("conn:dest", "c", 2, 0.5), f"{name}: a released slot is free"
            await asyncio.sleep(0.7)  # a and c stop renewing, as a killed pod would
            assert await store.lease("conn:dest", "d", 2, 5) and await store.lease("conn:dest", "e", 2, 5), name
    asyncio.run(scenario())


def test_rates_count_what_they_let_through_and_say_how_long_to_wait(redis_server: RedisServer,
                                                                  tmp_path: Path) -> None:
    async def scenario() -> None:
        async for store in both(redis_server, tmp_path):
            name = type(store).__name__
            waits = [await store.take("rate:dest", 3, 1.0) for _ in range(5)]
            assert waits[:3] == [0.0, 0.0, 0.0], name
            assert all(0 < w <= 1.0 for w in waits[3:]), f"{name}: {waits}"
            await asyncio.sleep(waits[-1] + 0.05)
            assert await store.take("rate:dest", 3, 1.0) == 0.0, f"{name}: the window moved on"
    asyncio.run(scenario())


def test_counters_add_up_and_expire(redis_server: RedisServer, tmp_path: Path) -> None:
    async def scenario() -> None:
        async for store in both(redis_server, tmp_path):
            name = type(store).__name__
            assert await store.get("daily:x") == 0
            assert [await store.add("daily:x", 0.5) for _ in range(3)] == [1, 2, 3], name
            assert await store.add("daily:x", 0.5, 4) == 7 and await store.get("daily:x") == 7, name
            await asyncio.sleep(0.7)
            assert await store.get("daily:x") == 0, f"{name}: the counter outlived its ttl"
    asyncio.run(scenario())


def test_two_clients_of_one_redis_share_the_counters(redis_server: RedisServer, tmp_path: Path) -> None:
    async def scenario() -> None:
        first, second = redis_store(redis_server, tmp_path), redis_store(redis_server, tmp_path)
        try:
            # Many holders at once, from two clients: exactly the limit get a slot.
            granted = await asyncio.gather(*[(first if n % 2 else second).lease("conn:shared", f"h{n}", 5, 10)
                                             for n in range(40)])
            assert sum(granted) == 5
            taken = await asyncio.gather(*[(first if n % 2 else second).take("rate:shared", 7, 60)
                                           for n in range(30)])
            assert taken.count(0.0) == 7
        finally:
            await first.close()
            await second.close()
    asyncio.run(scenario())


def test_a_wrong_password_or_no_server_is_a_store_error(redis_server: RedisServer, tmp_path: Path) -> None:
    async def scenario() -> None:
        secret = tmp_path / "wrong"
        secret.write_text("not-the-password")
        for store in (RedisStore(redis_server.url, password_file=secret),
                      RedisStore(f"redis://127.0.0.1:{redis_server.port + 1 if redis_server.port < 65535 else 1}/0",
                                 timeout=0.3)):
            with pytest.raises(LimitsStoreError, match=r"redis://127\.0\.0\.1"):
                await store.lease("conn:x", "a", 1, 1)
            await store.close()
    asyncio.run(scenario())


def test_fallback_divides_the_limits_while_redis_is_down_and_returns_to_it(redis_server: RedisServer,
                                                                         tmp_path: Path) -> None:
    async def scenario() -> list[tuple[str, dict[str, object]]]:
        store = FallbackStore(redis_store(redis_server, tmp_path, timeout=0.3), replicas=3, retry=0.5)
        seen: list[tuple[str, dict[str, object]]] = []

        def subscriber(name: str, fields: dict[str, object]) -> None:
            seen.append((name, fields))
        obs_log.subscribe(subscriber)
        try:
            assert [await store.lease("conn:d", f"h{n}", 6, 30) for n in range(7)].count(True) == 6
            redis_server.stop()
            started = time.monotonic()
            # While it is down: this pod's share, 6 // 3 = 2, answered at once after the first
            # failure, and counting the slots it held already: those renew, no new one is given...
            assert [await store.lease("conn:d", f"h{n}", 6, 30) for n in range(6)].count(True) == 6
            assert not await store.lease("conn:d", "new", 6, 30)
            for n in range(1, 6):
                await store.release("conn:d", f"h{n}")
            # ...until fewer than the share are held.
            assert [await store.lease("conn:d", f"l{n}", 6, 30) for n in range(4)].count(True) == 1
            assert [await store.take("rate:d", 9, 60) for _ in range(5)].count(0.0) == 3
            assert store.share(9) == 3 and not store.up
            assert time.monotonic() - started < 2.0, "each call must not wait out the timeout again"
            redis_server.start()  # same port: the store comes back
            await asyncio.sleep(0.6)
            assert await store.lease("conn:d", "back", 6, 30) and store.up
        finally:
            obs_log.unsubscribe(subscriber)
        await store.close()
        return seen
    seen = asyncio.run(scenario())
    names = [name for name, _ in seen]
    assert names.count("limits_store_down") == 1 and names.count("limits_store_up") == 1, names
    down = dict(seen)["limits_store_down"]
    assert down["replicas"] == 3 and "redis://127.0.0.1" in str(down["store"])
