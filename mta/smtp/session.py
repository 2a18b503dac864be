"""What happens on each SMTP command of a session: policy, then the queue.

The aiosmtpd handler for one listener.  MAIL and RCPT check address syntax
and relay permission; DATA prepares the message (``mta.receive``), makes it
durable in the spool and only then answers ``250 ... queued as ID``.  Every
error, expected or not, becomes a reply through ``mta.smtp.replies``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from mta import receive
from mta.config import Config, ListenerConfig
from mta.obs.log import event
from mta.policy import address, relay
from mta.scheduler.queue import Scheduler
from mta.smtp import replies
from spool import Recipient, Record, Spool
from spool.ids import new_id

log = logging.getLogger(__name__)


# A check run at MAIL FROM before a transaction starts (disk space, ...): it
# raises ``replies.Rejected`` to refuse new mail.
Admission = Callable[[], None]


class SessionHandler:
    def __init__(self, listener: ListenerConfig, config: Config, spool: Spool, scheduler: Scheduler,
                 admission: Sequence[Admission] = ()) -> None:
        self.listener = listener
        self.config = config
        self.spool = spool
        self.scheduler = scheduler
        self.admission = list(admission)

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        # aiosmtpd lists SIZE, 8BITMIME, SMTPUTF8 (and STARTTLS/AUTH when set
        # up); PIPELINING and ENHANCEDSTATUSCODES are ours to announce.
        last = responses.pop()  # "250 HELP"
        responses += ["250-PIPELINING", "250-ENHANCEDSTATUSCODES", last]
        return responses

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address_text: str,
                          mail_options: list[str]) -> str:
        for check in self.admission:
            check()
        address.parse_sender(address_text)
        # aiosmtpd needs a truthy mail_from to allow RCPT; "<>" stays "<>" until DATA.
        envelope.mail_from = address_text
        envelope.mail_options.extend(mail_options)
        return str(replies.SENDER_OK)

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address_text: str,
                          rcpt_options: list[str]) -> str:
        rcpt = address.parse_recipient(address_text)
        try:
            relay.check_relay(session.peer, self.listener.trusted_networks)
        except replies.Rejected as exc:
            event("rejected", level=logging.WARNING, listener=self.listener.name, client=_peer(session),
                  recipient=address_text, reply=str(exc.reply), reason=exc.detail)
            raise
        if len(envelope.rcpt_tos) >= self.config.limits.max_recipients:
            raise replies.Rejected(replies.TOO_MANY_RECIPIENTS)
        if str(rcpt).lower() not in {r.lower() for r in envelope.rcpt_tos}:
            envelope.rcpt_tos.append(address_text)
            envelope.rcpt_options.extend(rcpt_options)
        return str(replies.RECIPIENT_OK)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        queue_id = new_id()
        try:
            now = time.time()
            raw = envelope.original_content or b""
            protocol = "ESMTP" if session.extended_smtp else "SMTP"
            if session.ssl:
                protocol += "S"
            arrival = receive.Arrival(
                queue_id=queue_id,
                helo=session.host_name or "unknown",
                client_ip=_peer(session),
                hostname=self.config.hostname,
                protocol=protocol,
                recipients=tuple(envelope.rcpt_tos),
                when=receive.now(),
            )
            message = receive.prepare(raw, arrival)
            options = {o.upper() for o in envelope.mail_options}
            record = Record(
                id=queue_id,
                sender="" if envelope.mail_from in (None, "", "<>") else envelope.mail_from,
                recipients=[Recipient(r) for r in envelope.rcpt_tos],
                created=now,
                expires=now + self.config.queue.lifetime,
                next_attempt=now,
                size=len(message),
                attrs={
                    "listener": self.listener.name,
                    "client": _peer(session),
                    "helo": session.host_name,
                    "smtputf8": bool(envelope.smtp_utf8),
                    "8bitmime": "BODY=8BITMIME" in options,
                },
            )
            stored = await self.spool.store(message, record)
        except Exception as exc:  # noqa: BLE001 - every failure must still get a reply
            reply = replies.for_exception(exc)
            log.error("queue_id=%s not queued: %r", queue_id, exc)
            event("rejected", level=logging.WARNING, queue_id=queue_id, listener=self.listener.name,
                  client=_peer(session), reply=str(reply), reason=str(exc) or type(exc).__name__)
            return str(reply)
        event("received", queue_id=queue_id, listener=self.listener.name, client=_peer(session),
              helo=session.host_name, sender=record.sender or "<>", recipients=len(record.recipients),
              size=stored.size)
        self.scheduler.accept(stored)
        return str(replies.queued(queue_id))

    async def handle_exception(self, error: Exception) -> str:
        reply = replies.for_exception(error)
        if isinstance(error, replies.Rejected):
            log.info("rejected: %s (%s)", reply, error.detail)
        else:
            log.exception("session error")
        return str(reply)


def _peer(session: Session) -> str:
    peer: Any = session.peer
    return str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)
