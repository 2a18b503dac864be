"""Build an RFC 3464 delivery status notification for failed recipients.

The DSN is a ``multipart/report; report-type=delivery-status`` message: a
human-readable part, the machine-readable ``message/delivery-status`` part
(one block per failed recipient with ``Status``, ``Remote-MTA`` and the
remote server's reply as ``Diagnostic-Code``), and the original message's
header as ``text/rfc822-headers``.  It is sent with the null sender, so it
can never bounce in turn.  Failure: none; it only formats.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime, make_msgid


@dataclass(frozen=True)
class FailedRecipient:
    address: str
    status: str  # the RFC 3463 status: the remote reply's, or ours ("4.4.7" when it expired)
    diagnostic: str  # the remote reply as it came, or our own explanation
    remote: str | None  # "mx.example.com[192.0.2.1]" when a server answered
    expired: bool = False
    answered: bool = False  # the diagnostic is a server's reply (an "smtp" Diagnostic-Code)


def _fold(text: str) -> str:
    return " ".join(text.split())


def build(
    *,
    reporting_mta: str,
    queue_id: str,
    original_sender: str,
    original_header: bytes,
    arrival: datetime,
    failed: list[FailedRecipient],
    now: datetime,
) -> bytes:
    """The complete DSN message, CRLF line endings."""
    boundary = f"=_kubemta_{secrets.token_hex(12)}"
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{original_sender}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {format_datetime(now)}",
        f"Message-ID: {make_msgid(domain=reporting_mta)}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated delivery status notification.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
        f"This is the mail system at host {reporting_mta}.",
        "",
        "Your message could not be delivered to one or more recipients.",
        "",
    ]
    for item in failed:
        why = "the message stayed in the queue too long" if item.expired else "the message was refused"
        host = f" by {item.remote}" if item.remote else ""
        lines.append(f"<{item.address}>: {why}{host}: {_fold(item.diagnostic)}")
    lines += [
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "",
        f"Reporting-MTA: dns; {reporting_mta}",
        f"X-Kubemta-Queue-ID: {queue_id}",
        f"Arrival-Date: {format_datetime(arrival)}",
    ]
    for item in failed:
        # A failed action must carry a non-success status.
        status = item.status if item.status[:1] in ("4", "5") else "5.0.0"
        lines += ["", f"Final-Recipient: rfc822; {item.address}", "Action: failed", f"Status: {status}"]
        if item.remote:
            lines.append(f"Remote-MTA: dns; {item.remote.split('[', 1)[0]}")
        diagnostic = _fold(item.diagnostic)
        if item.answered and item.remote:
            lines.append(f"Diagnostic-Code: smtp; {diagnostic}")
        else:
            lines.append(f"Diagnostic-Code: X-Kubemta; {diagnostic}")
        lines.append(f"Last-Attempt-Date: {format_datetime(now)}")
    lines += ["", f"--{boundary}", "Content-Type: text/rfc822-headers", "", ""]
    head = "\r\n".join(lines).encode("utf-8")
    header = original_header if original_header.endswith(b"\r\n") or not original_header else original_header + b"\r\n"
    tail = f"\r\n--{boundary}--\r\n".encode("ascii")
    return head + header + tail
