"""A delivery lane's connection slot: taken from the limits store, renewed, given back.

Every lane (``mta.scheduler.queue``) holds one of its destination's
``max_connections`` slots, counted for the whole deployment in the limits
store (``mta.scheduler.shaping`` → ``mta.limits``), from before its first
transaction until it ends.  ``take`` asks for one; when every slot is held
by other pods it asks again each ``LEASE_POLL`` seconds, for at most
``LEASE_WAIT``, unless a lane of this pod holds one for the destination
already (that lane takes the jobs).  A held lease is renewed in the
background every ``lease_ttl / 3``; a renewal that finds the slot gone (it
expired while the store was away, and another pod took it) sets ``lost``,
and the lane stops after its transaction.  A pod that dies stops renewing:
its slots come back after ``lease_ttl``.

Failure: none; the store's fallback always answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mta.scheduler.destination import Destination
from mta.scheduler.shaping import Shaper

LEASE_POLL, LEASE_WAIT = 1.0, 60.0


@dataclass
class Lease:
    holder: str
    renewal: asyncio.Task[None] | None = None
    lost: asyncio.Event = field(default_factory=asyncio.Event)


class ConnectionLeases:
    def __init__(self, shaper: Shaper, hostname: str) -> None:
        self.shaper = shaper
        # Held under this process's name and a lane number.
        self._holder = f"{hostname}:{os.getpid()}"
        self._numbers = itertools.count(1)

    async def take(self, destination: Destination, stopping: Callable[[], bool]) -> Lease | None:
        """A slot for ``destination``; None when this lane is not needed (no jobs left, or this
        pod's other lanes hold slots and take the jobs) or none came within ``LEASE_WAIT``."""
        name = destination.hop.name
        holder = f"{self._holder}:{next(self._numbers)}"
        deadline = time.monotonic() + LEASE_WAIT
        while not stopping() and destination.jobs:
            if await self.shaper.lease(name, holder):
                destination.leased += 1
                lease = Lease(holder)
                lease.renewal = asyncio.ensure_future(self._renew(name, lease))
                return lease
            if destination.leased or time.monotonic() >= deadline:
                return None  # the lane's end defers what no lane is left to take
            await asyncio.sleep(LEASE_POLL)  # other pods hold every slot
        return None

    async def _renew(self, name: str, lease: Lease) -> None:
        while not lease.lost.is_set():
            await asyncio.sleep(self.shaper.lease_ttl / 3)
            if not await self.shaper.lease(name, lease.holder):
                lease.lost.set()

    async def end(self, destination: Destination, lease: Lease) -> None:
        """Stop renewing and give the slot back (after the lane's connections are closed)."""
        if lease.renewal is not None:
            lease.renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lease.renewal
        await self.shaper.release(destination.hop.name, lease.holder)
