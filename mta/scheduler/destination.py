"""One next hop's share of the queue: its jobs, its lanes, how idle lanes are woken.

A ``Job`` is one message for those of its recipients that share a next hop;
a ``Destination`` holds the jobs waiting for that hop and counts the lanes
(``mta.scheduler.queue``) delivering them.  An idle lane waits on an event
of its own, registered here, so that a new job (``nudge``), the scheduler's
stop and the delivery slots (``mta.scheduler.slots``) can each wake it.

Failure: none; these are plain records.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from mta.delivery.courier import Parcel
from mta.delivery.route import NextHop
from mta.dsnrequest import MailRequest, RecipientRequest
from spool import Record

# How long a lane waits for more mail for the same next hop before it ends:
# a steady trickle then reuses one session instead of opening (and closing)
# one per message.
IDLE_CONNECTION = 2.0


@dataclass
class Job:
    record: Record
    recipients: list[str]

    def parcel(self) -> Parcel:
        record = self.record
        attrs = record.attrs
        wanted = set(self.recipients)
        # What receive measured; a record from before it did has only what the client declared.
        return Parcel(record.id, record.sender, self.recipients, record.size,
                      smtputf8=bool(attrs.get("smtputf8") or attrs.get("utf8_headers")),
                      eight_bit=bool(attrs.get("8bit", attrs.get("8bitmime"))),
                      dsn=MailRequest.from_attrs(attrs),
                      recipient_dsn={r.address: RecipientRequest.from_attrs(r.attrs) for r in record.recipients
                                     if r.attrs and r.address in wanted})


@dataclass
class Destination:
    hop: NextHop
    jobs: deque[Job] = field(default_factory=deque)
    lanes: int = 0
    leased: int = 0  # lanes holding one of the deployment's connection slots (``mta.scheduler.leases``)
    delivering: int = 0  # lanes with a transaction under way (each on a connection of its own)
    idle: set[asyncio.Event] = field(default_factory=set)  # one per lane waiting for mail

    def nudge(self) -> None:
        """Wake every idle lane: a job was queued, or the scheduler stops."""
        for wake in self.idle:
            wake.set()
