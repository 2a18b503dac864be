"""DSN parameters (RFC 3461) on MAIL and RCPT, taken out before aiosmtpd sees them.

aiosmtpd refuses every MAIL or RCPT parameter it does not know (``555``)
and upper-cases the others, values included, while ENVID and ORCPT are
case-sensitive.  ``DsnParameters``, mixed into the listener's protocol,
takes RET and ENVID out of MAIL and NOTIFY and ORCPT out of RCPT as the
client wrote them (the address parser hands it the text after the address),
validates them (``mta.dsnrequest``) and, once the handler has answered
``250``, keeps them on the transaction's envelope (``DsnEnvelope``): one
``MailRequest``, one ``RecipientRequest`` per recipient.  ``queued_attrs``
gives the intake what to store.  A session that greeted with HELO keeps
aiosmtpd's answer to any parameter (a syntax error).

Failure: a bad value raises ``Rejected`` (``501 5.5.4``) from the address
parser; aiosmtpd hands it to the handler's exception hook, the one error
mapper, and the command has no effect.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiosmtpd.smtp import Envelope, Session, syntax

from mta.dsnrequest import MAIL_PARAMETERS, RCPT_PARAMETERS, MailRequest, RecipientRequest, parse_mail, parse_recipient


class DsnEnvelope(Envelope):
    def __init__(self) -> None:
        super().__init__()
        self.dsn = MailRequest()
        self.dsn_recipients: dict[str, RecipientRequest] = {}  # by address, lower-cased


class DsnParameters:
    """Mixed into an aiosmtpd ``SMTP`` subclass, ahead of ``SMTP`` among its bases."""

    envelope: Envelope | None
    session: Session | None
    _dsn_command: str | None = None  # the command whose parameters are being read
    _dsn_found: MailRequest | RecipientRequest | None = None

    def _create_envelope(self) -> DsnEnvelope:
        return DsnEnvelope()

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        await self._reading("MAIL", super().smtp_MAIL, arg)  # type: ignore[misc]

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        await self._reading("RCPT", super().smtp_RCPT, arg)  # type: ignore[misc]

    async def _reading(self, command: str, run: Callable[[str | None], Awaitable[None]], arg: str | None) -> None:
        self._dsn_command, self._dsn_found = command, None
        try:
            await run(arg)
        finally:
            self._dsn_command = self._dsn_found = None

    def take_dsn_parameters(self, rest: str | None) -> str | None:
        """``rest`` (the text after a MAIL or RCPT address) without its DSN parameters, which are kept."""
        command = self._dsn_command
        if command is None or not rest or self.session is None or not self.session.extended_smtp:
            return rest
        names = MAIL_PARAMETERS if command == "MAIL" else RCPT_PARAMETERS
        kept: list[str] = []
        taken: list[tuple[str, str]] = []
        for word in rest.split():
            name, _, value = word.partition("=")
            if name.upper() in names:
                taken.append((name.upper(), value))
            else:
                kept.append(word)
        if taken:
            self._dsn_found = parse_mail(taken) if command == "MAIL" else parse_recipient(taken)
        return " ".join(kept)

    async def _call_handler_hook(self, command: str, *args: Any) -> Any:
        status = await super()._call_handler_hook(command, *args)  # type: ignore[misc]
        envelope = self.envelope
        if (command in ("MAIL", "RCPT") and isinstance(status, str) and status.startswith("250")
                and isinstance(envelope, DsnEnvelope)):
            found = self._dsn_found
            if isinstance(found, MailRequest):
                envelope.dsn = found
            elif isinstance(found, RecipientRequest):
                envelope.dsn_recipients.setdefault(str(args[0]).lower(), found)
        return status


def queued_attrs(envelope: Envelope) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """What the spool keeps of the transaction's DSN request: the record's attrs and each recipient's."""
    if not isinstance(envelope, DsnEnvelope):
        return {}, {}
    recipients: dict[str, dict[str, Any]] = {}
    for address in envelope.rcpt_tos:
        request = envelope.dsn_recipients.get(address.lower())
        attrs = request.to_attrs() if request is not None else {}
        if attrs:
            recipients[address] = attrs
    return envelope.dsn.to_attrs(), recipients
