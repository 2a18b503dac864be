"""Returning mail to its sender: the DSN for failed recipients, queued like any mail.

The scheduler decides that recipients failed; ``Bouncer.bounce`` writes the
RFC 3464 report (``mta.bounce.dsn``) with the original header (the whole
message when the client asked ``RET=FULL``), marks what its delivery needs
(SMTPUTF8 for an internationalised report, 8-bit content) and puts it
through the intake with the null sender, so it is stored, scheduled and
delivered as any message is, and can never bounce in turn (RFC 5321
§4.5.5): mail that already has the null sender is not bounced at all.

Failure: ``SpoolError`` when the original cannot be read or the DSN cannot
be stored; the caller keeps the original's state and tries again.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from mta.bounce import dsn
from mta.intake import Envelope, Intake
from mta.message import split_header
from mta.obs.log import event
from spool import Record


class Bouncer:
    def __init__(self, intake: Intake, content: Callable[[str], Awaitable[bytes]], reporting_mta: str,
                 lifetime: float) -> None:
        self.intake = intake
        self.content = content
        self.reporting_mta = reporting_mta
        self.lifetime = lifetime

    async def bounce(self, record: Record, failed: list[dsn.FailedRecipient], now: float) -> None:
        if not record.sender:
            event("bounce_suppressed", level=logging.WARNING, queue_id=record.id,
                  reason="null sender", recipients=len(failed))
            return
        original = await self.content(record.id)
        header, _ = split_header(original)
        message = dsn.build(
            reporting_mta=self.reporting_mta,
            queue_id=record.id,
            original_sender=record.sender,
            original_header=header,
            arrival=datetime.fromtimestamp(record.created, UTC),
            failed=failed,
            now=datetime.fromtimestamp(now, UTC),
            original=original if record.attrs.get("ret") == "FULL" else None,
        )
        # What delivery needs to know, as receive records it for other mail: only
        # an internationalised (RFC 6533) report has octets beyond ASCII.
        international = not message.isascii()
        attrs = {"dsn_for": record.id, "smtputf8": international, "8bit": international}
        stored = await self.intake.put(Envelope("", [record.sender], attrs, lifetime=self.lifetime), message)
        event("queued", queue_id=stored.id, sender="<>", recipients=1, size=stored.size, dsn_for=record.id)
