"""The one way into the queue: store durably, then announce.

Every producer of mail — an SMTP session, the HTTP handoff from another
pod, a bounce — calls ``Intake.put`` (chasquid's ``Queue.Put``): it builds
the spool record, stores it (``fsync`` before it returns) and only then
announces it to whoever schedules it.  In ``mta serve`` the announcement
goes to the scheduler in the same process; in a worker process it goes
over the channel to the main process (``mta.workers``); both are an
``announce`` callable, so producers do not know which.

While ``mta serve`` still loads the spool's earlier mail in the background
(``Spool.load``), a put that reuses an id from before the load's cut-off (a
handoff from another pod, a retried idempotent request) waits for the load
to end: the loader owns those ids until then (``wait_for_load``).

Failure: ``SpoolError`` from the store propagates and nothing is
announced; the producer answers its client (``451``, ``500``) and keeps
nothing.  An announcement cannot fail the put: the record is on disk and a
worker's unannounced mail is found again by the rescan.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from spool import Recipient, Record, Spool
from spool.ids import new_id, since
from spool.store import DEFERRED, HOLD

Announce = Callable[[Record], None]


@dataclass(frozen=True)
class Envelope:
    sender: str  # "" for the null sender
    recipients: Sequence[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    lifetime: float | None = None  # seconds in the queue; None: queue.lifetime
    recipient_attrs: Mapping[str, dict[str, Any]] = field(default_factory=dict)  # by address, where any


class Taker(Protocol):
    """What a listener hands a finished message to: this queue intake, or a feedback listener's receiver."""

    async def put(self, envelope: Envelope, data: bytes, *, queue_id: str | None = None) -> Record: ...


class Intake:
    def __init__(self, spool: Spool, announce: Announce, lifetime: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.spool = spool
        self.announce = announce
        self.lifetime = lifetime
        self.clock = clock
        self._cutoff: str | None = None
        self._loaded: asyncio.Event | None = None

    def wait_for_load(self, cutoff: str, loaded: asyncio.Event) -> None:
        """Until ``loaded`` is set, puts of ids from before ``cutoff`` (``Spool.take``) wait."""
        self._cutoff, self._loaded = cutoff, loaded

    async def settled(self, record_id: str) -> None:
        """Return once ``record_id`` is not the loader's to read (at once for an id made after the cut-off)."""
        if self._loaded is not None and self._cutoff is not None and not self._loaded.is_set() \
                and not since(record_id, self._cutoff):
            await self._loaded.wait()

    async def put(self, envelope: Envelope, data: bytes, *, queue_id: str | None = None) -> Record:
        """Queue a new message; ``queue_id`` when the producer already named it (a Received header)."""
        if queue_id is not None:
            await self.settled(queue_id)
        now = self.clock()
        lifetime = self.lifetime if envelope.lifetime is None else envelope.lifetime
        record = Record(
            id=queue_id or new_id(now),
            sender=envelope.sender,
            recipients=[Recipient(address, attrs=dict(envelope.recipient_attrs.get(address, {})))
                        for address in envelope.recipients],
            created=now,
            expires=now + lifetime,
            next_attempt=now,
            size=len(data),
            attrs=dict(envelope.attrs),
        )
        stored = await self.spool.store(data, record)
        if record.attrs.get("held_recipients"):
            # A suppressed recipient with suppression.action "hold": an operator decides.
            stored = await self.spool.save(stored, HOLD)
        self.announce(stored)
        return stored

    async def put_record(self, record: Record, data: bytes) -> Record:
        """Queue a record made elsewhere (a handoff), keeping its recipients' states, attempts and times."""
        await self.settled(record.id)
        state = record.state
        stored = await self.spool.store(data, record)
        if state in (DEFERRED, HOLD):
            stored = await self.spool.save(stored, state)
        self.announce(stored)
        return stored
