"""Turn the bytes a client sent into the message we queue.

Owns: line-ending normalisation (a bare CR or LF becomes CRLF, so nothing
smuggling-shaped is stored or later signed), the trace header (``Received``),
and the ``Message-ID``/``Date`` a submission may lack (RFC 6409 §8).
It does not parse MIME and never changes the body beyond line endings.
Failure: none expected; it works on any bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime, make_msgid

_LINE_ENDINGS = re.compile(rb"\r\n|\r|\n")
_HEADER_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:", re.MULTILINE)


@dataclass(frozen=True)
class Arrival:
    """Facts of the session a message came in through."""

    queue_id: str
    helo: str
    client_ip: str
    hostname: str  # ours
    protocol: str  # SMTP, ESMTP, ESMTPS, ...
    recipients: tuple[str, ...]
    when: datetime


def normalise(data: bytes) -> bytes:
    """CRLF line endings everywhere, and a final CRLF."""
    data = _LINE_ENDINGS.sub(b"\r\n", data)
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


def split_header(data: bytes) -> tuple[bytes, bytes]:
    """(header block including its final CRLF, rest starting at the blank line)."""
    if data.startswith(b"\r\n"):
        return b"", data
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return data, b""
    return data[: end + 2], data[end + 2 :]


def header_names(header: bytes) -> set[bytes]:
    return {name.lower() for name in _HEADER_NAME.findall(header)}


def _clean(text: str) -> str:
    # Client-supplied text goes into a header: keep it on one line, printable.
    return re.sub(r"[^\x21-\x7e]", "?", text)[:255] or "unknown"


def received_header(arrival: Arrival) -> bytes:
    parts = [
        f"Received: from {_clean(arrival.helo)} ([{_clean(arrival.client_ip)}])",
        f"\tby {arrival.hostname} (kubemta) with {arrival.protocol} id {arrival.queue_id}",
    ]
    date = format_datetime(arrival.when)
    if len(arrival.recipients) == 1:
        parts.append(f"\tfor <{_clean(arrival.recipients[0])}>; {date}")
    else:
        parts[-1] += ";"
        parts.append(f"\t{date}")
    return ("\r\n".join(parts) + "\r\n").encode("ascii")


def prepare(data: bytes, arrival: Arrival) -> bytes:
    """The message as queued: normalised, traced, with Message-ID and Date."""
    data = normalise(data)
    header, rest = split_header(data)
    names = header_names(header)
    if header and not names:
        # No header block at all: the whole text is body.
        header, rest = b"", b"\r\n" + data
    added = [received_header(arrival)]
    extra = b""
    if b"message-id" not in names:
        extra += f"Message-ID: {make_msgid(domain=arrival.hostname)}\r\n".encode("ascii")
    if b"date" not in names:
        extra += f"Date: {format_datetime(arrival.when)}\r\n".encode("ascii")
    return b"".join(added) + header + extra + rest


def now() -> datetime:
    return datetime.now(UTC)
