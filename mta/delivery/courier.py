"""The courier: carries one message to one next hop and reports.

``Courier.deliver(hop, parcel)`` is the whole interface the scheduler sees
(chasquid's ``Courier.Deliver``): it takes a kept-open connection to the hop
or opens one, makes the content legal for that server (7-bit conversion,
long lines: ``mta.transfer_encoding``), signs it (DKIM), runs the
transaction and returns a ``Report`` — an ``Outcome`` per recipient, and whether the hop could be
reached at all.  Connections stay open between deliveries, at most
``per_connection`` transactions each; a kept-open connection the server has
closed meanwhile is replaced once, since nothing was sent on it.  The
scheduler says when idle connections are no longer wanted (``release``) or
must not be used again (``discard``, after a throttle).

Failure: ``deliver`` never raises for remote or local trouble, it reports
it: a hop that cannot be reached gives ``reached=False`` with the reason for
every recipient.  A local failure that would recur on every attempt with
the same stored message — content this server cannot take, a message
dkimpy cannot parse — is permanent at once (``5.6.x``), so the sender gets
a DSN instead of five days of retries; any other local error is temporary.
It never sleeps, retries later or touches the spool.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from mta import transfer_encoding as encoding
from mta.delivery import result
from mta.delivery.client import ConnectFailed, Connection, StaleConnection
from mta.delivery.result import Kind, Outcome
from mta.delivery.route import NextHop
from mta.dkim.signer import Signer, SigningError
from mta.dsnrequest import MailRequest, RecipientRequest
from mta.obs.log import about, event
from mta.transfer_encoding import Unconvertible

log = logging.getLogger(__name__)

Opener = Callable[[NextHop], Awaitable[Connection]]
Content = Callable[[str], Awaitable[bytes]]  # the stored message by queue id
ReturnPath = Callable[[str, list[str]], str]  # (queue id, recipients) -> the envelope sender to send


@dataclass(frozen=True)
class Parcel:
    """One message, for those of its recipients that share a next hop."""

    queue_id: str
    sender: str  # "" for the null sender
    recipients: list[str]
    size: int
    smtputf8: bool = False  # the envelope or the header needs SMTPUTF8
    eight_bit: bool = False  # the body has 8-bit octets
    # What the client asked of notifications (RFC 3461), passed on where the server offers DSN.
    dsn: MailRequest = field(default_factory=MailRequest)
    recipient_dsn: Mapping[str, RecipientRequest] = field(default_factory=dict)


@dataclass
class Report:
    outcomes: dict[str, Outcome]
    reached: bool = True  # False: the hop cannot be reached now, which holds for all its mail
    server: str | None = None  # the host that answered ("" for an address literal), when one did


def _server(connection: Connection | None) -> str | None:
    return None if connection is None else connection.mx_host or ""


def connection_outcome(connection: Connection | None, code: int, enhanced: str, text: str) -> Outcome:
    """A permanent failure of our own, naming the server when one was reached."""
    if connection is None:
        return result.permanent(code, enhanced, text)
    return connection.outcome(Kind.PERMANENT, code, enhanced, text)


class Courier:
    def __init__(self, opener: Opener, content: Content, signer: Signer | None = None,
                 return_path: ReturnPath | None = None) -> None:
        self.opener = opener
        self.content = content
        self.signer = signer
        self.return_path = return_path  # feedback.domain: the signed VERP sender (mta.feedback.verp)
        self._idle: dict[NextHop, list[Connection]] = {}

    async def deliver(self, hop: NextHop, parcel: Parcel, per_connection: int) -> Report:
        # Every log line of this attempt, down to each mail exchanger tried, names the message.
        with about(parcel.queue_id):
            return await self._deliver(hop, parcel, per_connection)

    async def _deliver(self, hop: NextHop, parcel: Parcel, per_connection: int) -> Report:
        connection: Connection | None = None
        try:
            stored = await self.content(parcel.queue_id)
            limit = hop.route.max_message_size if hop.route is not None else None
            if limit and len(stored) > limit:
                # The route's provider documents this limit: no connection would change the answer.
                return Report(dict.fromkeys(parcel.recipients, result.permanent(
                    552, "5.3.4", f"the message has {len(stored)} octets; {hop} accepts at most {limit}")))
            connection = await self._take(hop, per_connection)
            try:
                outcomes = await self._send(connection, parcel, self._fit(stored, parcel, connection))
            except StaleConnection:
                # Nothing was sent on the old session: once more on a fresh one.
                await connection.close()
                connection = None
                connection = await self.opener(hop)
                outcomes = await self._send(connection, parcel, self._fit(stored, parcel, connection))
        except Unconvertible as exc:
            event("local_error", level=logging.WARNING, queue_id=parcel.queue_id, reason="content", detail=str(exc))
            return Report(dict.fromkeys(parcel.recipients, connection_outcome(connection, 554, "5.6.3", str(exc))),
                          server=_server(connection))
        except SigningError as exc:
            # Never send unsigned what a key is configured for; the same
            # message would fail the same way on every attempt.
            event("dkim_failed", level=logging.ERROR, queue_id=parcel.queue_id, reason=str(exc))
            event("local_error", level=logging.WARNING, queue_id=parcel.queue_id, reason="dkim", detail=str(exc))
            return Report(dict.fromkeys(parcel.recipients, result.permanent(554, "5.6.0", str(exc))),
                          server=_server(connection))
        except ConnectFailed as exc:
            event("connect_failed", level=logging.WARNING, queue_id=parcel.queue_id, destination=str(hop),
                  reply=str(exc.outcome.reply))
            return Report(dict.fromkeys(parcel.recipients, exc.outcome), reached=False)
        except Exception:
            log.exception("queue_id=%s delivery attempt failed locally", parcel.queue_id)
            if connection is not None:
                connection.usable = False
            local = result.transient(451, "4.3.0", "local error during delivery")
            return Report(dict.fromkeys(parcel.recipients, local))
        finally:
            if connection is not None:
                await self._put_back(hop, connection, per_connection)
        return Report(outcomes, server=_server(connection))

    def _fit(self, stored: bytes, parcel: Parcel, connection: Connection) -> bytes:
        """The stored message as this server may take it, signed."""
        seven_bit = parcel.eight_bit and not connection.supports("8bitmime")
        data = encoding.prepare(stored, seven_bit=seven_bit)
        return self.signer.sign(data) if self.signer is not None else data

    async def _take(self, hop: NextHop, per_connection: int) -> Connection:
        idle = self._idle.get(hop)
        while idle:
            connection = idle.pop()
            if connection.usable and connection.transactions < per_connection:
                return connection
            await connection.close()
        return await self.opener(hop)

    async def _put_back(self, hop: NextHop, connection: Connection, per_connection: int) -> None:
        if connection.usable and connection.transactions < per_connection:
            self._idle.setdefault(hop, []).append(connection)
        else:
            await connection.close()

    async def _send(self, connection: Connection, parcel: Parcel, data: bytes) -> dict[str, Outcome]:
        domain = parcel.recipients[0].rpartition("@")[2].lower() if parcel.recipients else None
        tls = connection.tls_info()
        tls_fields = {"tls": False} if tls is None else {"tls": True, "tls_version": tls.version,
                                                          "tls_cipher": tls.cipher}
        if connection.verdict is not None:
            tls_fields.update(connection.verdict.fields())
        event("attempt", queue_id=parcel.queue_id, remote=connection.remote, **tls_fields,
              recipients=len(parcel.recipients), size=parcel.size, domain=domain)
        started = time.monotonic()
        # The null sender (a DSN of ours) stays null: a bounce is never answered with a bounce.
        sender = parcel.sender
        if sender and self.return_path is not None:
            sender = self.return_path(parcel.queue_id, parcel.recipients)
        outcomes = await connection.send(sender, parcel.recipients, data, smtputf8=parcel.smtputf8,
                                         eight_bit=parcel.eight_bit, dsn=parcel.dsn,
                                         recipient_dsn=parcel.recipient_dsn)
        event("attempt_done", level=logging.DEBUG, queue_id=parcel.queue_id, remote=connection.remote,
              domain=domain, duration=round(time.monotonic() - started, 6), recipients=len(parcel.recipients))
        return outcomes

    async def discard(self, hop: NextHop) -> None:
        """Close the hop's idle connections: it asked us to slow down."""
        for connection in self._idle.pop(hop, []):
            connection.usable = False
            await connection.close()

    async def release(self, hop: NextHop, keep: int) -> None:
        """Keep at most ``keep`` idle connections to ``hop`` (those its remaining senders may reuse)."""
        idle = self._idle.get(hop, [])
        while len(idle) > keep:
            await idle.pop(0).close()
        if not idle:
            self._idle.pop(hop, None)

    async def close(self) -> None:
        for hop in list(self._idle):
            await self.release(hop, 0)
