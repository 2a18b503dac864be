"""Build a delivery status notification (RFC 3464): failed, delayed or relayed recipients.

The DSN is a ``multipart/report; report-type=delivery-status`` message
built with the standard library's ``email`` package: a human-readable part,
the machine-readable status part (the client's ENVID as
``Original-Envelope-Id``; one block per recipient with its ORCPT as
``Original-Recipient``, ``Action``, ``Status``, ``Remote-MTA`` and a
``Diagnostic-Code``: ``smtp`` when it is a server's reply, ``X-Kubemta``
when the failure was ours; ``Will-Retry-Until`` for a delay), and the
original message's header (or, for a failure with ``RET=FULL``, the whole
message).  Mail whose
sender, recipients or header are internationalised gets the RFC 6533 types
(``message/global-delivery-status``, ``message/global-headers``) and UTF-8
headers, and must be sent with SMTPUTF8 (``needs_smtputf8``).  No line is
longer than 998 octets.  It is sent with the null sender, so it can never
bounce in turn.

Failure: none; it only formats.
"""

from __future__ import annotations

import email.policy
import textwrap
from dataclasses import dataclass
from datetime import datetime
from email.generator import BytesGenerator
from email.message import EmailMessage, MIMEPart
from email.utils import format_datetime, make_msgid
from io import BytesIO

MAX_FIELD = 900  # octets of one status field's text: well inside 998 once folded


FAILED, DELAYED, RELAYED = "failed", "delayed", "relayed"  # the DSN's Action (RFC 3464 §2.3.3)

_SUBJECT = {FAILED: "Undelivered Mail Returned to Sender", DELAYED: "Delayed Mail (still being retried)",
            RELAYED: "Successful Mail Delivery Report"}
_SUMMARY = {
    FAILED: "Your message could not be delivered to one or more recipients.",
    DELAYED: "Your message could not be delivered to one or more recipients yet. It is still being "
             "retried; you need not send it again.",
    RELAYED: "Your message was relayed to the mail servers of one or more recipients. Those servers do "
             "not offer delivery notifications, so you will hear no more of it from them.",
}
_STATUS_CLASS = {FAILED: ("4", "5"), DELAYED: ("4",), RELAYED: ("2",)}
_DEFAULT_STATUS = {FAILED: "5.0.0", DELAYED: "4.0.0", RELAYED: "2.0.0"}


@dataclass(frozen=True)
class ReportedRecipient:
    address: str
    status: str  # the RFC 3463 status: the remote reply's, or ours ("4.4.7" when it expired)
    diagnostic: str  # the remote reply as it came, or our own explanation
    remote: str | None  # "mx.example.com[192.0.2.1]" when a server answered
    expired: bool = False
    answered: bool = False  # the diagnostic is a server's reply (an "smtp" Diagnostic-Code)
    original: str | None = None  # the client's ORCPT, "rfc822;user@example.com" (decoded)
    category: str | None = None  # why it failed (mta.bounce.classify): "invalid_recipient", "reputation", ...


def _one_line(text: str) -> str:
    return " ".join(text.split())[:MAX_FIELD]


def _field(name: str, value: str) -> str:
    """A status field, folded at spaces (RFC 3464 fields fold like header fields)."""
    lines = textwrap.wrap(f"{name}: {_one_line(value)}", width=76, break_long_words=False,
                          break_on_hyphens=False, subsequent_indent=" ")
    return "\r\n".join(lines)


def needs_smtputf8(original_sender: str, original_header: bytes, recipients: list[ReportedRecipient],
                   envid: str | None = None) -> bool:
    return not (original_sender.isascii() and original_header.isascii() and (envid or "").isascii()
                and all(item.address.isascii() and (item.original or "").isascii() for item in recipients))


def _raw(text: str) -> str:
    # The generator carries octets it cannot encode as surrogates (as the parser reads them).
    return text.encode("utf-8").decode("ascii", "surrogateescape")


class _Generator(BytesGenerator):
    """Writes the report's status and returned parts as the prepared lines they are.

    The library's ``message/*`` writers expect parsed sub-messages (and ASCII);
    ours are folded status blocks and original octets, which its text writer
    emits line by line with CRLF, UTF-8 included.
    """

    _handle_message_delivery_status = BytesGenerator._handle_text
    _handle_message_global_delivery_status = BytesGenerator._handle_text
    _handle_message_global_headers = BytesGenerator._handle_text
    _handle_message_global = BytesGenerator._handle_text


def _human(item: ReportedRecipient, action: str) -> str:
    if action == RELAYED:
        return f"<{item.address}>: relayed to {item.remote or 'the next server'}: {_one_line(item.diagnostic)}"
    if action == DELAYED:
        return f"<{item.address}>: not delivered yet: {_one_line(item.diagnostic)}"
    why = "the message stayed in the queue too long" if item.expired else "the message was refused"
    if item.remote and item.answered:
        why += f" by {item.remote}"
    elif item.remote:
        why = f"the message could not be sent to {item.remote}"
    category = f" (bounce category: {item.category})" if item.category else ""
    return f"<{item.address}>: {why}: {_one_line(item.diagnostic)}{category}"


def build(
    *,
    reporting_mta: str,
    queue_id: str,
    original_sender: str,
    original_header: bytes,
    arrival: datetime,
    recipients: list[ReportedRecipient],
    now: datetime,
    original: bytes | None = None,
    action: str = FAILED,
    envid: str | None = None,
    retry_until: datetime | None = None,
) -> bytes:
    """The complete DSN message, CRLF line endings, reporting ``action`` for every one of ``recipients``.

    ``original`` attaches the whole message (RET=FULL; only a failure
    returns content, RFC 3461 §6.2); ``envid`` is the client's ENVID and
    ``retry_until`` the end of the queue lifetime, for a delay notice.
    """
    international = (needs_smtputf8(original_sender, original_header, recipients, envid)
                     or not (original or b"").isascii())
    policy = email.policy.SMTPUTF8 if international else email.policy.SMTP

    human = [f"This is the mail system at host {reporting_mta}.", "", _SUMMARY[action], ""]
    human += [_human(item, action) for item in recipients]
    if retry_until is not None:
        human += ["", f"It will be retried until {format_datetime(retry_until)}."]
    text = MIMEPart(policy=policy)
    text.set_content("\n".join(human) + "\n", charset="utf-8")

    message_fields = [_field("Original-Envelope-Id", envid)] if envid is not None else []
    message_fields += [_field("Reporting-MTA", f"dns; {reporting_mta}"),
                       _field("Arrival-Date", format_datetime(arrival)),
                       _field("X-Kubemta-Queue-ID", queue_id)]
    blocks = ["\r\n".join(message_fields)]
    for item in recipients:
        address_type = "rfc822" if item.address.isascii() else "utf-8"
        kind, _, address = (item.original or "").partition(";")
        fields = [_field("Original-Recipient", f"{kind}; {address}")] if item.original else []
        # The status must be of the action's class: a failure is never 2.x.x.
        status = item.status if item.status[:1] in _STATUS_CLASS[action] else _DEFAULT_STATUS[action]
        fields += [_field("Final-Recipient", f"{address_type}; {item.address}"), f"Action: {action}",
                   f"Status: {status}"]
        if item.remote:
            fields.append(_field("Remote-MTA", f"dns; {item.remote.split('[', 1)[0] or item.remote}"))
        diagnostic = "smtp" if item.answered and item.remote else "X-Kubemta"
        fields += [_field("Diagnostic-Code", f"{diagnostic}; {item.diagnostic}"),
                   _field("Last-Attempt-Date", format_datetime(now))]
        if item.category:
            # An extension field (RFC 3464 §2.4): the Diagnostic-Code stays the server's words.
            fields.append(_field("X-Kubemta-Bounce-Category", item.category))
        if retry_until is not None:
            fields.append(_field("Will-Retry-Until", format_datetime(retry_until)))
        blocks.append("\r\n".join(fields))
    status_part = MIMEPart(policy=policy)
    status_part["Content-Type"] = "message/global-delivery-status" if international else "message/delivery-status"
    status_part.set_payload(_raw("\r\n\r\n".join(blocks) + "\r\n"))

    returned = MIMEPart(policy=policy)
    if original is not None:
        returned["Content-Type"] = "message/global" if international else "message/rfc822"
        returned.set_payload(original.decode("ascii", "surrogateescape"))
    else:
        header = original_header if original_header.endswith(b"\r\n") or not original_header \
            else original_header + b"\r\n"
        returned["Content-Type"] = "message/global-headers" if international else "text/rfc822-headers"
        returned.set_payload(header.decode("ascii", "surrogateescape"))

    report = EmailMessage(policy=policy)
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"
    report["To"] = f"<{original_sender}>"
    report["Subject"] = _SUBJECT[action]
    report["Date"] = format_datetime(now)
    report["Message-ID"] = make_msgid(domain=reporting_mta)
    report["Auto-Submitted"] = "auto-replied"
    report["MIME-Version"] = "1.0"
    report["Content-Type"] = "multipart/report; report-type=delivery-status"
    report.preamble = "This is a MIME-encapsulated delivery status notification."
    report.set_payload([text, status_part, returned])
    out = BytesIO()
    _Generator(out, mangle_from_=False, policy=policy).flatten(report)
    return out.getvalue()
