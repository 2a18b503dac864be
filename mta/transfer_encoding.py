"""Making a message legal for the receiver at hand, before it is signed.

A leaf like ``mta.message``: the courier uses it before signing, and the
content policy at DATA (``mta.content``) tries it on a message with long
lines, so that one it cannot convert is refused before ``250``.

Two repairs, both done by re-encoding leaf MIME parts with the standard
library's ``email`` package and leaving every other byte alone:

- **7-bit conversion** (RFC 6152 §3): a message with 8-bit octets in its
  body, for a receiver that offers no 8BITMIME, gets its 8-bit parts
  re-encoded — quoted-printable for ``text/*``, base64 for the rest — as
  Postfix does.  ``message/*`` and ``multipart/*`` parts cannot change
  their encoding (RFC 2046); their own parts are converted and their
  ``Content-Transfer-Encoding`` becomes ``7bit``.
- **Long lines** (RFC 5321 §4.5.3.1.6: at most 998 octets): a part with a
  longer line is re-encoded the same way, whatever the receiver offers.

Failure: ``Unconvertible`` when a header holds 8-bit octets (nothing in
MIME can carry them to a 7-bit receiver) or a part that would need
re-encoding is itself a ``message/*`` or ``multipart/*`` body with bare
8-bit text; the courier reports that as a permanent failure (``5.6.3``).
"""

from __future__ import annotations

import base64
import email
import email.policy
from email import quoprimime
from email.generator import BytesGenerator
from email.message import Message
from io import BytesIO

from mta.message import split_header

MAX_LINE = 998  # octets, without the CRLF

# compat32 keeps header fields as they came; no refolding, CRLF out.
_POLICY = email.policy.compat32.clone(linesep="\r\n", max_line_length=0)


class Unconvertible(Exception):
    """The message cannot be made legal for this receiver; the text says why."""


def is_8bit(data: bytes) -> bool:
    return not data.isascii()


def has_long_lines(data: bytes) -> bool:
    return any(len(line) > MAX_LINE for line in data.split(b"\r\n"))


def _needs_work(raw: bytes, seven_bit: bool) -> bool:
    return (seven_bit and is_8bit(raw)) or has_long_lines(raw)


def _reencode(part: Message, raw: bytes) -> None:
    """Give a leaf part a 7-bit encoding with short lines, its decoded content unchanged."""
    del part["Content-Transfer-Encoding"]
    if part.get_content_maintype() == "text":
        # latin-1 maps each octet to one code point, which quoprimime writes as =XX.
        text = raw.decode("latin-1").replace("\r\n", "\n")
        part.set_payload(quoprimime.body_encode(text, maxlinelen=76, eol="\n"))
        part["Content-Transfer-Encoding"] = "quoted-printable"
    else:
        part.set_payload(base64.encodebytes(raw).decode("ascii"))
        part["Content-Transfer-Encoding"] = "base64"


def _leaf_content(part: Message) -> bytes:
    decoded = part.get_payload(decode=True)
    return decoded if isinstance(decoded, bytes) else b""


def _convert(message: Message, seven_bit: bool) -> bool:
    """Re-encode what needs it, depth first; True when anything changed."""
    changed = False
    if message.is_multipart():
        for part in message.get_payload():
            changed |= _convert(part, seven_bit)
        if changed and seven_bit and message.get("Content-Transfer-Encoding", "").lower() in ("8bit", "binary"):
            del message["Content-Transfer-Encoding"]
            message["Content-Transfer-Encoding"] = "7bit"
        return changed
    encoding = message.get("Content-Transfer-Encoding", "7bit").strip().lower()
    encoded = encoding in ("base64", "quoted-printable")
    # 7bit, 8bit and binary parts "decode" to their octets as they came.
    content = _leaf_content(message)
    if encoded:
        payload = message.get_payload()
        raw = payload.encode("ascii", "surrogateescape") if isinstance(payload, str) else b""
    else:
        raw = content
    if not _needs_work(raw, seven_bit):
        return False
    # An already-encoded part with long lines (base64 on one line) is decoded and rewrapped.
    _reencode(message, content)
    return True


def prepare(data: bytes, *, seven_bit: bool) -> bytes:
    """``data`` as it may go to this receiver: 7-bit if ``seven_bit``, lines of at most 998 octets."""
    if not _needs_work(data, seven_bit):
        return data
    header, _ = split_header(data)
    if seven_bit and is_8bit(header):
        raise Unconvertible("the message has 8-bit octets in its header, and the receiver accepts only 7-bit mail")
    if has_long_lines(header):
        raise Unconvertible("a header line is longer than 998 octets")
    message = email.message_from_bytes(data, policy=_POLICY)
    for part in message.walk():
        opaque = part.get_content_maintype() in ("message", "multipart") and not part.is_multipart()
        if opaque and _needs_work(_leaf_content(part), seven_bit):
            raise Unconvertible(f"a {part.get_content_type()} part with 8-bit content cannot be re-encoded")
    if not _convert(message, seven_bit):
        return data
    out = BytesIO()
    BytesGenerator(out, mangle_from_=False, policy=_POLICY).flatten(message)
    result = out.getvalue()
    if (seven_bit and is_8bit(result)) or has_long_lines(result):
        raise Unconvertible("the message could not be re-encoded for this receiver")
    return result
