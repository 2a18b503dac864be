"""An open, greeted SMTP session with one server, and the mail transactions on it.

``Connection.send`` runs one transaction and maps every reply to an
``Outcome`` per recipient, carrying the server's name and address, the
session's TLS and, for direct delivery, the TLS policy it ran under.
``mta.delivery.client`` opens connections.

Failure: ``send`` never raises for remote trouble, it reports it, and marks
the connection unusable when the session is broken; ``StaleConnection``
when a kept-open session was closed before anything was sent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import aiosmtplib

from mta import replies
from mta.delivery import result
from mta.delivery.result import Kind, Outcome, PolicyVerdict, Tls
from mta.dsnrequest import MailRequest, RecipientRequest
from mta.message import has_bare_line_endings


class StaleConnection(Exception):
    """A kept-open connection turned out to be closed before this transaction
    began: nothing was sent, so the caller may simply use a new connection."""


def reply_text(exc: aiosmtplib.SMTPResponseException) -> str:
    return str(replies.from_server(exc.code, exc.message))


class Connection:
    """An open, greeted SMTP session with one server."""

    def __init__(self, smtp: aiosmtplib.SMTP, mx_host: str | None, mx_ip: str | None,
                 verdict: PolicyVerdict | None = None) -> None:
        self.smtp = smtp
        self.mx_host = mx_host
        self.mx_ip = mx_ip
        self.verdict = verdict  # direct delivery: the TLS policy the session runs under
        self.usable = True
        self.transactions = 0

    @property
    def remote(self) -> str:
        """``mx.example.com[192.0.2.1]``, ``[192.0.2.1]`` for an address literal, a relay's ``host:port``."""
        return result.remote_name(self.mx_host, self.mx_ip) or "?"

    @property
    def tls(self) -> bool:
        return self.tls_info() is not None

    def tls_info(self) -> Tls | None:
        """The session's TLS version and cipher, or None (plain text, or already closed)."""
        if not self.smtp.is_connected:
            return None
        ssl_object = self.smtp.get_transport_info("ssl_object")
        if ssl_object is None:
            return None
        cipher = ssl_object.cipher()
        return Tls(ssl_object.version() or "", cipher[0] if cipher else None)

    def supports(self, extension: str) -> bool:
        return bool(self.smtp.supports_extension(extension))

    def size_limit(self) -> int | None:
        """The SIZE the server announced (RFC 1870), or None for none or 0 (no limit)."""
        value = self.smtp.esmtp_extensions.get("size", "")
        return int(value) if value.strip().isdigit() and int(value) > 0 else None

    def outcome(self, kind: Kind, code: int, enhanced: str, text: str) -> Outcome:
        """An outcome of our own wording about this server."""
        return Outcome(kind, replies.Reply(code, enhanced, text), self.mx_host, self.mx_ip, self.tls_info(),
                       policy=self.verdict)

    def _answered(self, exc: aiosmtplib.SMTPResponseException) -> Outcome:
        return result.from_server(exc.code, exc.message, self.mx_host, self.mx_ip, self.tls_info(), self.verdict)

    async def send(
        self, sender: str, recipients: Sequence[str], data: bytes, *, smtputf8: bool = False, eight_bit: bool = False,
        dsn: MailRequest | None = None, recipient_dsn: Mapping[str, RecipientRequest] | None = None,
    ) -> dict[str, Outcome]:
        smtp, remote = self.smtp, self.remote
        if not smtp.is_connected:
            self.usable = False
            raise StaleConnection(f"{remote} closed the session")
        tls = self.tls_info()
        outcomes: dict[str, Outcome] = {}
        options: list[str] = []
        encoding = "ascii"
        if smtputf8:
            if not smtp.supports_extension("smtputf8"):
                outcome = self.outcome(Kind.PERMANENT, 553, "5.6.7",
                                       f"the message needs SMTPUTF8, which {remote} does not offer")
                return dict.fromkeys(recipients, outcome)
            options.append("SMTPUTF8")
            encoding = "utf-8"
        if eight_bit and smtp.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        if smtp.supports_extension("size"):
            limit = self.size_limit()
            if limit and len(data) > limit:
                outcome = self.outcome(Kind.PERMANENT, 552, "5.3.4",
                                       f"the message has {len(data)} octets; {remote} accepts at most {limit}")
                return dict.fromkeys(recipients, outcome)
            options.append(f"SIZE={len(data)}")
        # A server without DSN gets none of it (RFC 3461 §5.2.2): we notify for it.
        passes_dsn = smtp.supports_extension("dsn")
        if passes_dsn and dsn is not None:
            options += dsn.mail_options()
        self.transactions += 1
        try:
            try:
                await smtp.mail(sender, options=options, encoding=encoding)
            except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as exc:
                if self.transactions > 1:
                    # The server closed the idle session (a restart, an idle timeout).
                    self.usable = False
                    raise StaleConnection(str(exc)) from None
                raise
            except aiosmtplib.SMTPResponseException as exc:
                outcome = self._answered(exc)
                await self._reset_after(exc.code)
                return dict.fromkeys(recipients, outcome)
            accepted = []
            for rcpt in recipients:
                request = recipient_dsn.get(rcpt) if passes_dsn and recipient_dsn else None
                try:
                    await smtp.rcpt(rcpt, options=request.rcpt_options() if request else None, encoding=encoding)
                    accepted.append(rcpt)
                except aiosmtplib.SMTPResponseException as exc:
                    outcomes[rcpt] = self._answered(exc)
                    if exc.code == 421:
                        raise
            if not accepted:
                await self._reset_after(0)
                return outcomes
            try:
                response = await self._data(data)
            except aiosmtplib.SMTPResponseException as exc:
                outcome = self._answered(exc)
                if exc.code == 421:
                    self.usable = False
                outcomes.update(dict.fromkeys(accepted, outcome))
                return outcomes
            done = result.from_server(response.code, response.message, self.mx_host, self.mx_ip, tls, self.verdict)
            outcomes.update(dict.fromkeys(accepted, replace(done, dsn_passed=passes_dsn)))
            return outcomes
        except (aiosmtplib.SMTPException, OSError) as exc:
            # The session broke (disconnect, timeout, 421): everything not yet
            # answered for is undecided and will be tried again.
            self.usable = False
            reply = reply_text(exc) if isinstance(exc, aiosmtplib.SMTPResponseException) else f"{exc}"
            outcome = Outcome(Kind.TRANSIENT, replies.Reply(451, "4.4.2", f"connection to {remote} lost: {reply}"),
                              self.mx_host, self.mx_ip, tls, policy=self.verdict)
            for rcpt in recipients:
                outcomes.setdefault(rcpt, outcome)
            return outcomes

    async def _data(self, data: bytes) -> aiosmtplib.SMTPResponse:
        """DATA and the content.

        Messages leave the spool with CRLF line endings (``mta.receive``
        normalises them), so only the leading dots need doubling (RFC 5321
        §4.5.2), a bytes replace; aiosmtplib's ``data`` runs two regular
        expressions over every message, a tenth of the delivery path's time.
        """
        smtp = self.smtp
        if has_bare_line_endings(data):
            return await smtp.data(data)  # aiosmtplib fixes them
        start = await smtp.execute_command(b"DATA")
        if start.code != 354:
            raise aiosmtplib.SMTPDataError(start.code, start.message)
        if data[:1] == b"." or b"\n." in data:
            data = (b"\n" + data).replace(b"\n.", b"\n..")[1:]
        if data and not data.endswith(b"\r\n"):
            data += b"\r\n"
        # No await between the write and read_response: the reply cannot
        # arrive before aiosmtplib expects it.
        smtp.protocol.write(data + b".\r\n")
        response = await smtp.protocol.read_response(timeout=smtp.timeout)
        if response.code != 250:
            raise aiosmtplib.SMTPDataError(response.code, response.message)
        return response

    async def _reset_after(self, code: int) -> None:
        if code == 421:
            self.usable = False
            return
        try:
            await self.smtp.rset()
        except (aiosmtplib.SMTPException, OSError):
            self.usable = False

    async def close(self) -> None:
        try:
            if self.usable and self.smtp.is_connected:
                await self.smtp.quit()
        except (aiosmtplib.SMTPException, OSError):
            pass
        finally:
            self.smtp.close()
