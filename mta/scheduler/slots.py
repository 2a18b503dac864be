"""The global delivery slots (``delivery.max_concurrency``), with idle connections that give way.

A lane (one coroutine delivering one next hop's mail over one connection)
takes a slot to deliver and gives it up while it waits for more mail for
its hop (``park``): it keeps its connection in the courier's pool, which
still counts against ``max_concurrency``, but the moment another lane
wants a slot and none is free the oldest parked lane is told to leave
(its event is set and ``resume`` answers False) and its slot goes to the
waiting lane — Postfix's connection cache, which hands an idle session
back when a delivery agent is wanted elsewhere.  So no destination ever
waits behind an idle connection.  The evicted lane closes its connection
as it leaves, a moment after the slot changed hands.

Slots pass to waiters in the order they asked (FIFO).

Failure: none of its own.  A lane cancelled while it waits in ``take``
gives back a slot that was already handed to it.
"""

from __future__ import annotations

import asyncio
from collections import deque


class DeliverySlots:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.busy = 0  # lanes delivering now
        self._parked: dict[object, asyncio.Event] = {}  # idle lanes, oldest first
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def parked(self) -> int:
        return len(self._parked)

    def _free(self) -> bool:
        return self.busy + len(self._parked) < self.capacity

    def _claim(self) -> bool:
        """Count one more busy lane if a slot is free or a parked lane can be sent away."""
        if not self._free():
            if not self._parked:
                return False
            lane = next(iter(self._parked))
            self._parked.pop(lane).set()  # it wakes, finds itself evicted and closes its connection
        self.busy += 1
        return True

    async def take(self) -> None:
        """Wait for a slot (the caller is busy once this returns)."""
        if not self._waiters and self._claim():
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.give_back()  # handed over just as we were cancelled
            else:
                self._waiters.remove(waiter)
            raise

    def give_back(self) -> None:
        """A busy lane is done with its slot (and leaves, or waits without a connection)."""
        self.busy -= 1
        self._hand_over()

    def park(self, lane: object, wake: asyncio.Event) -> None:
        """A busy lane waits idle, connection kept: ``wake`` is set if its slot is wanted."""
        self.busy -= 1
        self._parked[lane] = wake
        self._hand_over()

    def resume(self, lane: object) -> bool:
        """A parked lane has mail again: True if it still has its slot (it is busy again)."""
        if self._parked.pop(lane, None) is None:
            return False
        self.busy += 1
        return True

    def leave(self, lane: object) -> None:
        """A lane that is not busy ends (parked or not)."""
        if self._parked.pop(lane, None) is not None:
            self._hand_over()

    def _hand_over(self) -> None:
        while self._waiters:
            if self._waiters[0].done():  # cancelled meanwhile
                self._waiters.popleft()
                continue
            if not self._claim():
                return
            self._waiters.popleft().set_result(None)
