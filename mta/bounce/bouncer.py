"""Telling the sender: failure, delay and relay notices, as the client asked, queued like any mail.

The scheduler decides what happened to each recipient in a round;
``Bouncer.report`` decides which notices that calls for, by each
recipient's NOTIFY (RFC 3461; ``mta.dsnrequest``): a failure notice unless
the recipient asked for none of it (``NOTIFY=NEVER``, or a list without
FAILURE), a "relayed" notice for ``NOTIFY=SUCCESS`` when the server that
took the message offers no DSN (one that does got the request and notifies
in our place, RFC 3461 §5.2), and a "delayed" notice, once, for
``NOTIFY=DELAY`` when the message has waited ``queue.delay_warning``.  A
recipient without NOTIFY gets failure notices only.  Each notice is an
RFC 3464 report (``mta.bounce.dsn``) with the client's ENVID and ORCPT,
the original header (the whole message for a failure the client asked
``RET=FULL`` for); it is marked for delivery as it needs (SMTPUTF8 for an
internationalised report, 8-bit content) and put through the intake with
the null sender, so it is stored, scheduled and delivered as any message
is, and can never bounce in turn (RFC 5321 §4.5.5): mail that already has
the null sender gets no notice at all.

Failure: ``SpoolError`` when the original cannot be read or a notice cannot
be stored; the caller keeps the original's state and tries again (a delay
notice is marked as sent only once it is stored).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime

from mta import replies
from mta.bounce import dsn
from mta.bounce.dsn import DELAYED, FAILED, RELAYED, ReportedRecipient
from mta.dsnrequest import DELAY, FAILURE, SUCCESS, MailRequest, RecipientRequest
from mta.intake import Envelope, Intake
from mta.message import split_header
from mta.obs.log import event
from spool import Record

DELAY_NOTIFIED = "delay_notified"  # recipient attr: when its delay notice was queued


class Bouncer:
    def __init__(self, intake: Intake, content: Callable[[str], Awaitable[bytes]], reporting_mta: str,
                 lifetime: float, delay_warning: float = 0.0) -> None:
        self.intake = intake
        self.content = content
        self.reporting_mta = reporting_mta
        self.lifetime = lifetime
        self.delay_warning = delay_warning  # seconds in the queue before a delay notice; 0: none

    async def report(self, record: Record, failed: list[ReportedRecipient], relayed: list[ReportedRecipient],
                     now: float) -> None:
        """The notices a round calls for: ``failed`` recipients, ``relayed`` ones (delivered to a server
        without DSN), and pending recipients that have waited long enough for a delay notice."""
        if not record.sender:
            if failed:
                event("bounce_suppressed", level=logging.WARNING, queue_id=record.id,
                      reason="null sender", recipients=len(failed))
            return
        # Only recipients that asked something have attrs; the others get the default.
        requests = {r.address: RecipientRequest.from_attrs(r.attrs) for r in record.recipients if r.attrs}

        def asked(items: list[ReportedRecipient], keyword: str) -> list[ReportedRecipient]:
            found = []
            for item in items:
                request = requests.get(item.address, RecipientRequest())
                if keyword in request.notifies:
                    found.append(replace(item, original=request.orcpt))
            return found

        failures = asked(failed, FAILURE)
        if len(failures) < len(failed):
            # NOTIFY=NEVER (or without FAILURE): legacy apps ask it to avoid bounce storms.
            event("bounce_suppressed", queue_id=record.id, reason="NOTIFY", recipients=len(failed) - len(failures))
        if failures:
            await self._queue(record, failures, FAILED, now)
        successes = asked(relayed, SUCCESS)
        if successes:
            await self._queue(record, successes, RELAYED, now)
        delayed = asked(self._waited(record, now), DELAY)
        if delayed:
            await self._queue(record, delayed, DELAYED, now)
            for rcpt in record.recipients:
                if any(item.address == rcpt.address for item in delayed):
                    rcpt.attrs[DELAY_NOTIFIED] = now

    def _waited(self, record: Record, now: float) -> list[ReportedRecipient]:
        """Pending recipients that have waited ``delay_warning`` and had no delay notice yet."""
        if self.delay_warning <= 0 or now - record.created < self.delay_warning:
            return []
        waiting = []
        for rcpt in record.pending():
            if DELAY_NOTIFIED in rcpt.attrs:
                continue
            reply = replies.parse(rcpt.last_reply or "")
            status = reply.status if reply is not None else "4.0.0"
            waiting.append(ReportedRecipient(rcpt.address, status, rcpt.last_reply or "not tried yet", rcpt.remote,
                                             answered=rcpt.remote is not None))
        return waiting

    async def _queue(self, record: Record, recipients: list[ReportedRecipient], action: str, now: float) -> None:
        original = await self.content(record.id)
        header, _ = split_header(original)
        request = MailRequest.from_attrs(record.attrs)
        message = dsn.build(
            reporting_mta=self.reporting_mta,
            queue_id=record.id,
            original_sender=record.sender,
            original_header=header,
            arrival=datetime.fromtimestamp(record.created, UTC),
            recipients=recipients,
            now=datetime.fromtimestamp(now, UTC),
            # Content goes back only with a failure, and only if asked (RFC 3461 §4.3, §6.2).
            original=original if action == FAILED and request.ret == "FULL" else None,
            action=action,
            envid=request.envid,
            retry_until=datetime.fromtimestamp(record.expires, UTC) if action == DELAYED else None,
        )
        # What delivery needs to know, as receive records it for other mail: only
        # an internationalised (RFC 6533) report has octets beyond ASCII.
        international = not message.isascii()
        attrs = {"dsn_for": record.id, "smtputf8": international, "8bit": international}
        stored = await self.intake.put(Envelope("", [record.sender], attrs, lifetime=self.lifetime), message)
        event("queued", queue_id=stored.id, sender="<>", recipients=1, size=stored.size, dsn_for=record.id,
              action=action)
