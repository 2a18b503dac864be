"""KeyedLock: holders of one key run one at a time, other keys do not wait, nothing is kept after."""

from __future__ import annotations

import asyncio

from mta.keyed_lock import KeyedLock


def test_one_key_serialises_other_keys_run_and_nothing_is_kept() -> None:
    async def main() -> None:
        locks = KeyedLock()
        inside: dict[str, int] = {"a": 0, "b": 0}
        peak: dict[str, int] = {"a": 0, "b": 0}

        async def hold(key: str) -> None:
            async with locks.hold(key):
                inside[key] += 1
                peak[key] = max(peak[key], inside[key])
                await asyncio.sleep(0.01)
                inside[key] -= 1

        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(asyncio.gather(*(hold("a") for _ in range(5)), hold("b")), 5)
        elapsed = asyncio.get_running_loop().time() - started
        assert peak == {"a": 1, "b": 1}
        assert elapsed >= 0.05  # five holders of "a" one after another
        assert len(locks) == 0

    asyncio.run(main())


def test_a_cancelled_waiter_leaves_no_lock_behind() -> None:
    async def main() -> None:
        locks = KeyedLock()
        release = asyncio.Event()

        async def first() -> None:
            async with locks.hold("k"):
                await release.wait()

        holder = asyncio.create_task(first())
        await asyncio.sleep(0)
        waiter = asyncio.create_task(locks.hold("k").__aenter__())
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        assert len(locks) == 1  # the holder's
        release.set()
        await asyncio.wait_for(holder, 5)
        assert len(locks) == 0

    asyncio.run(main())
