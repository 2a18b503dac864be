"""Message bytes: line endings, the header block and its fields.

A leaf every stage may import (receive, delivery, bounces, the operator's
view).  It knows RFC 5322's outer shape only — CRLF lines, a header block
ended by an empty line, folded fields — and no MIME.
Failure: none; every function works on any bytes.
"""

from __future__ import annotations

import re

_LINE_ENDINGS = re.compile(rb"\r\n|\r|\n")
_HEADER_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:", re.MULTILINE)


def has_bare_line_endings(data: bytes) -> bool:
    """A CR or LF that is not part of a CRLF; counting is far cheaper than a regex."""
    crlf = data.count(b"\r\n")
    return data.count(b"\r") != crlf or data.count(b"\n") != crlf


def normalise(data: bytes) -> bytes:
    """CRLF line endings everywhere, and a final CRLF."""
    if has_bare_line_endings(data):
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


def header_fields(header: bytes) -> list[bytes]:
    """The header block split into fields, continuation lines kept with theirs."""
    fields: list[bytes] = []
    for line in header.split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\r\n" + line
        else:
            fields.append(line)
    return fields
