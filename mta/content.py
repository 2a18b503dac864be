"""The content policy at DATA: what is repaired, what is refused, what is measured.

One place decides, before ``250``, whether a message can be delivered as it
is stored, so that content is never the reason a delivery fails later:

Repaired (and logged):
- bare CR or LF line ends become CRLF (``limits.bare_line_endings: reject``
  refuses them instead);
- an mbox ``From `` line in front of the header is removed (it is no field);
- a line in the header block that is no field ends the header: the blank
  line that should separate header and body is inserted before it (a
  message with no field at all is all body);
- white space between a field name and its colon is removed
  (``X-Legacy : value`` becomes ``X-Legacy: value``; DKIM signers cannot
  read the first form);
- a header line over 998 octets is folded at white space.

Refused, with a catalogue reply from ``mta.replies``:
- a header line over 998 octets with nowhere to fold it, and a body line
  over 998 octets in a part that cannot be re-encoded (``550 5.6.0``);
- more ``Received:`` fields than ``limits.max_hops`` allows (``554 5.4.6``,
  a mail loop).

Measured, for the spool record (so delivery does not scan again): 8-bit
octets anywhere, 8-bit octets in the header, lines over 998 octets (which
the courier re-encodes, ``mta.transfer_encoding``, before signing).

Failure: ``Rejected`` for a refusal; nothing else is expected on any bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mta import message, replies, transfer_encoding
from mta.config import LimitsConfig
from mta.replies import Rejected

MAX_LINE = transfer_encoding.MAX_LINE
_FIELD = re.compile(rb"([!-9;-~]+)([ \t]*):")
# A run of more than 998 octets between line ends; the look-behind anchors
# each try at a line start, so a search stays linear however long lines are.
_LONG_LINE = re.compile(rb"(?<![^\r\n])[^\r\n]{%d}" % (MAX_LINE + 1))


@dataclass(frozen=True)
class Checked:
    data: bytes  # the message as it may be queued: CRLF, header and body separated
    eight_bit: bool  # 8-bit octets anywhere: BODY=8BITMIME, or 7-bit conversion
    utf8_headers: bool  # 8-bit octets in the header: SMTPUTF8
    long_lines: bool  # a line over 998 octets: re-encoded before delivery
    repairs: tuple[str, ...] = field(default=())


def line_over(data: bytes, limit: int) -> bool:
    """Whether a line (ended by CR, LF or CRLF) has more than ``limit`` octets."""
    if limit == MAX_LINE:
        return _LONG_LINE.search(data) is not None
    return re.search(rb"(?<![^\r\n])[^\r\n]{%d}" % (limit + 1), data) is not None


def _fold(line: bytes, name_length: int) -> bytes:
    """A header line folded at white space into lines of at most 998 octets."""
    pieces: list[bytes] = []
    while len(line) > MAX_LINE:
        cut = max(line.rfind(b" ", name_length + 2, MAX_LINE), line.rfind(b"\t", name_length + 2, MAX_LINE))
        if cut <= name_length + 1 or not line[:cut].strip(b" \t"):
            raise Rejected(replies.HEADER_UNREPRESENTABLE, "a header line over 998 octets with no white space")
        pieces.append(line[:cut])
        line, name_length = line[cut:], 0
    pieces.append(line)
    return b"\r\n".join(pieces)


def _split(data: bytes, repairs: list[str]) -> tuple[list[bytes], bytes]:
    """Header fields (repaired, continuation lines kept) and the body from its blank line on."""
    fields: list[bytes] = []
    names: list[int] = []
    pos = 0
    body: bytes | None = None
    if data.startswith(b"From ") and _FIELD.match(data) is None:  # "From : x" is a field
        pos = data.find(b"\r\n") + 2
        repairs.append("mbox From line removed")
    while pos < len(data):
        end = data.find(b"\r\n", pos)  # normalised: every line has its CRLF
        line = data[pos:end]
        if not line:
            body = data[pos:]
            break
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\r\n" + line
        else:
            match = _FIELD.match(line)
            if match is None:
                break
            if match[2]:
                line = match[1] + line[match.end(2):]
                repairs.append("space before colon")
            fields.append(line)
            names.append(len(match[1]))
        pos = end + 2
    if body is None:
        body = (b"\r\n" + data[pos:]) if pos < len(data) else b""
        if pos < len(data):
            repairs.append("separator inserted" if fields else "no header")
    for i, (text, name_length) in enumerate(zip(fields, names, strict=True)):
        if len(text) > MAX_LINE and line_over(text, MAX_LINE):
            lines = text.split(b"\r\n")
            lines[0] = _fold(lines[0], name_length)
            fields[i] = b"\r\n".join([lines[0], *(_fold(rest, 0) for rest in lines[1:])])
            repairs.append("header folded")
    return fields, body


def check(raw: bytes, limits: LimitsConfig) -> Checked:
    """Repair ``raw`` (DATA as read) or refuse it, and measure what delivery needs to know."""
    repairs: list[str] = []
    if message.has_bare_line_endings(raw):
        if limits.bare_line_endings == "reject":
            raise Rejected(replies.BARE_LINE_ENDING)
        repairs.append("bare line ends")
    data = message.normalise(raw)
    fields, body = _split(data, repairs)
    hops = sum(1 for f in fields if f[:9].lower() == b"received:")
    if hops >= limits.max_hops:
        raise Rejected(replies.TOO_MANY_HOPS, f"{hops} Received: fields")
    header = b"".join(f + b"\r\n" for f in fields)
    if repairs:
        data = header + body
    long_lines = _LONG_LINE.search(body) is not None
    if long_lines:
        try:
            transfer_encoding.prepare(data, seven_bit=False)
        except transfer_encoding.Unconvertible as exc:
            raise Rejected(replies.CONTENT_UNREPRESENTABLE, str(exc)) from None
    return Checked(data, eight_bit=not data.isascii(), utf8_headers=not header.isascii(), long_lines=long_lines,
                   repairs=tuple(dict.fromkeys(repairs)))
