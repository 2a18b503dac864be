"""What an arriving report says: a DSN (RFC 3464) or a complaint (ARF, RFC 5965).

``read(data)`` parses the message with the standard library's ``email``
and returns a ``Report``:

- ``multipart/report; report-type=delivery-status``: one ``Notice`` per
  recipient block with ``Action: failed`` (a bounce) or ``delayed``, its
  ``Status`` and ``Diagnostic-Code``; ``delivered``, ``relayed`` and
  ``expanded`` blocks say nothing to act on and are left out;
- ``multipart/report; report-type=feedback-report``: a complaint with its
  ``Feedback-Type`` (abuse, fraud, virus, …), the recipient from
  ``Original-Rcpt-To`` or the included message's ``To``;
- anything else (an autoreply, a non-standard bounce): ``kind`` ``other``.

Either way the return path the report names is kept (``Original-Mail-From``,
the included message's ``Return-Path``) so that a complaint sent to an
abuse address, not to the return path, is still matched to its message.

Failure: never raises on content; a part it cannot read is skipped.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
import re
from dataclasses import dataclass, field
from email.message import Message

from mta.replies import Reply

_ADDRESS_TYPE = re.compile(r"^\s*(?:rfc822\s*;\s*)?<?(?P<address>[^<>\s;]+@[^<>\s;]+)>?\s*$", re.IGNORECASE)
_ANGLE = re.compile(r"<([^<>]+@[^<>]+)>")
_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")


@dataclass(frozen=True)
class Notice:
    recipient: str
    action: str  # failed | delayed
    status: str  # the enhanced code, e.g. 5.1.1
    diagnostic: str  # the remote server's reply, as the reporter gives it

    @property
    def reply(self) -> Reply:
        return diagnostic_reply(self.status, self.diagnostic, self.status.startswith("5"))


@dataclass
class Report:
    kind: str  # bounce | complaint | other
    notices: list[Notice] = field(default_factory=list)  # for a bounce
    feedback_type: str | None = None  # for a complaint
    complained: str | None = None  # the recipient who complained
    return_paths: list[str] = field(default_factory=list)  # where the report says the original came from
    reporter: str | None = None  # Reporting-MTA / Reported-Domain / User-Agent, for the log
    sending_domain: str | None = None  # the From domain of the original message the report includes


def diagnostic_reply(status: str, diagnostic: str, permanent: bool) -> Reply:
    """The reply a report gives as a status (``5.1.1``) and a diagnostic (``smtp; 550 5.1.1 no such user``)."""
    text = diagnostic.strip()
    kind, sep, rest = text.partition(";")
    if sep and kind.strip().lower() in ("smtp", "x-postfix", "x-unix", "x-local"):
        text = rest.strip()
    code_text, _, rest = text.partition(" ")
    has_code = code_text.isdigit() and len(code_text) == 3 and code_text[0] in "245"
    code = int(code_text) if has_code else (550 if permanent else 450)
    body = rest.strip() if has_code else text
    given = _ENHANCED.match(body)
    if _ENHANCED.fullmatch(status.strip()):
        enhanced = status.strip()
    elif given:  # "421 4.7.0 try later" with no Status of its own
        enhanced = given[0]
    else:
        enhanced = "5.0.0" if code >= 500 else "4.0.0"
    if body.startswith(enhanced):
        body = body[len(enhanced):].strip()
    return Reply(code, enhanced, body or "no diagnostic given")


def _address(value: str | None) -> str | None:
    if not value:
        return None
    found = _ADDRESS_TYPE.match(value)
    return found["address"] if found else None


def _fields(part: Message) -> list[Message]:
    """The field groups of a message/delivery-status or message/feedback-report part."""
    payload = part.get_payload()
    if isinstance(payload, list):  # message/delivery-status: email parses each block as a Message
        return [item for item in payload if isinstance(item, Message)]
    text = part.get_payload(decode=True) or b""
    blocks = re.split(rb"\r?\n\r?\n", text.strip())
    return [email.message_from_bytes(block) for block in blocks if block.strip()]


def _included(report: Message) -> Message | None:
    """The original message (or its header) the report carries, as its third part."""
    for part in report.walk():
        kind = part.get_content_type()
        if kind in ("message/rfc822", "message/global"):
            inner = part.get_payload()
            if isinstance(inner, list) and inner and isinstance(inner[0], Message):
                return inner[0]
        if kind in ("text/rfc822-headers", "message/rfc822-headers", "text/global-headers"):
            return email.message_from_bytes(part.get_payload(decode=True) or b"")
    return None


def read(data: bytes) -> Report:
    message = email.message_from_bytes(data, policy=email.policy.compat32)
    report_type = (message.get_param("report-type") or "").lower() if message.get_content_type() == \
        "multipart/report" else ""
    original = _included(message)
    return_paths = [found for found in [_address(original.get("Return-Path")) if original else None] if found]
    if report_type == "delivery-status":
        report = _dsn(message, return_paths, data)
    elif report_type == "feedback-report":
        report = _arf(message, original, return_paths)
    else:
        report = Report("other", return_paths=return_paths)
    sender = email.utils.parseaddr(original.get("From") or "")[1] if original is not None else ""
    report.sending_domain = sender.rpartition("@")[2].lower() or None
    return report


def _blocks(data: bytes) -> list[Message]:
    """Field blocks found in the raw text: for a report whose MIME structure is broken."""
    blocks = re.split(rb"\r?\n[ \t]*\r?\n", data)
    return [email.message_from_bytes(block.strip()) for block in blocks
            if re.search(rb"^(reporting-mta|final-recipient)[ \t]*:", block.strip(), re.IGNORECASE | re.MULTILINE)]


def _dsn(message: Message, return_paths: list[str], data: bytes) -> Report:
    report = Report("bounce", return_paths=return_paths)
    parts = [_fields(part) for part in message.walk()
             if part.get_content_type() in ("message/delivery-status", "message/global-delivery-status")]
    if not parts:
        # A boundary cut short (seen in the wild): the per-recipient fields are still in the text.
        found = _blocks(data)
        parts = [found if found and found[0].get("Reporting-MTA") else [Message(), *found]]
    for groups in parts:
        if groups:
            report.reporter = (groups[0].get("Reporting-MTA") or "").partition(";")[2].strip() or None
        for group in groups[1:]:
            action = (group.get("Action") or "").strip().lower()
            recipient = _address(group.get("Final-Recipient")) or _address(group.get("Original-Recipient"))
            if action not in ("failed", "delayed") or recipient is None:
                continue
            status = (group.get("Status") or "").strip().split(" ")[0]
            diagnostic = " ".join((group.get("Diagnostic-Code") or "").partition(";")[2].split())
            report.notices.append(Notice(recipient, action, status, diagnostic))
    return report


def _arf(message: Message, original: Message | None, return_paths: list[str]) -> Report:
    report = Report("complaint", return_paths=return_paths)
    for part in message.walk():
        if part.get_content_type() != "message/feedback-report":
            continue
        for group in _fields(part):
            report.feedback_type = report.feedback_type or (group.get("Feedback-Type") or "").strip().lower() or None
            report.complained = report.complained or _address(group.get("Original-Rcpt-To"))
            mail_from = _address(group.get("Original-Mail-From"))
            if mail_from:
                report.return_paths.insert(0, mail_from)
            report.reporter = report.reporter or (group.get("Reported-Domain") or group.get("User-Agent") or None)
    if report.complained is None and original is not None:
        found = _ANGLE.search(original.get("To") or "") or _ADDRESS_TYPE.match(original.get("To") or "")
        report.complained = found.group(1) if found and found.re is _ANGLE else (found["address"] if found else None)
    return report
