"""The delivery slots on their own: parked lanes give way, waiters are served in order, cancellation leaks nothing."""

from __future__ import annotations

import asyncio

from mta.scheduler.slots import DeliverySlots


def test_a_parked_lane_gives_its_slot_to_a_waiter_and_is_told_to_leave() -> None:
    async def main() -> None:
        slots = DeliverySlots(1)
        await slots.take()
        wake = asyncio.Event()
        slots.park("a", wake)
        assert (slots.busy, slots.parked) == (0, 1) and not wake.is_set()
        await asyncio.wait_for(slots.take(), 1)  # another destination: the idle one gives way
        assert wake.is_set() and not slots.resume("a")
        assert (slots.busy, slots.parked) == (1, 0)
        slots.leave("a")
        slots.give_back()
        assert (slots.busy, slots.parked) == (0, 0)

    asyncio.run(main())


def test_a_parked_lane_resumes_when_no_one_wanted_its_slot() -> None:
    async def main() -> None:
        slots = DeliverySlots(2)
        await slots.take()
        slots.park("a", asyncio.Event())
        assert slots.resume("a") and slots.busy == 1

    asyncio.run(main())


def test_waiters_are_served_in_order_and_a_cancelled_one_leaks_no_slot() -> None:
    async def main() -> None:
        slots = DeliverySlots(1)
        await slots.take()
        order: list[str] = []

        async def lane(name: str) -> None:
            await slots.take()
            order.append(name)

        first = asyncio.create_task(lane("first"))
        doomed = asyncio.create_task(lane("doomed"))
        last = asyncio.create_task(lane("last"))
        await asyncio.sleep(0)
        doomed.cancel()
        await asyncio.sleep(0)
        slots.give_back()
        await asyncio.wait_for(first, 1)
        slots.give_back()
        await asyncio.wait_for(last, 1)
        assert order == ["first", "last"]
        # Handed a slot and cancelled before it ran: the slot comes back.
        late = asyncio.create_task(lane("late"))
        await asyncio.sleep(0)
        slots.give_back()  # "last" is done: the slot goes to "late"...
        late.cancel()  # ...which is cancelled before it runs
        await asyncio.gather(late, return_exceptions=True)
        assert slots.busy == 0

    asyncio.run(main())
