"""Envelope address syntax: what an address must look like to be queued.

Checks what aiosmtpd has already split out of ``MAIL FROM``/``RCPT TO``.
Failure: ``Rejected`` with a 501 reply naming sender or recipient syntax.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from mta import replies

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"^(?=.{{1,253}}$)(?:{_LABEL}\.)*{_LABEL}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f<>]")


@dataclass(frozen=True)
class Address:
    local: str
    domain: str  # lower case; A-labels for IDNs, or an address literal

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"


def _domain(text: str) -> str | None:
    if text.startswith("[") and text.endswith("]"):
        literal = text[1:-1]
        if literal.lower().startswith("ipv6:"):
            literal = literal[5:]
        try:
            ipaddress.ip_address(literal)
        except ValueError:
            return None
        return text.lower()
    try:
        ascii_name = text.encode("idna").decode("ascii") if not text.isascii() else text
    except UnicodeError:
        return None
    ascii_name = ascii_name.rstrip(".").lower()
    return ascii_name if _DOMAIN.match(ascii_name) and "." in ascii_name else None


def parse(text: str) -> Address | None:
    """Split ``local@domain``; None when it is not a deliverable address."""
    if not text or _CONTROL.search(text):
        return None
    local, at, domain_text = text.rpartition("@")
    if not at or not local or len(local) > 64 or len(text) > 254:
        return None
    quoted = len(local) > 1 and local.startswith('"') and local.endswith('"')
    if " " in local and not quoted:
        return None
    domain = _domain(domain_text)
    if domain is None:
        return None
    return Address(local, domain)


def parse_sender(text: str) -> Address | None:
    """A sender address; ``None`` for the null sender ``<>``."""
    if text in ("", "<>"):
        return None
    address = parse(text)
    if address is None:
        raise replies.Rejected(replies.BAD_SENDER_SYNTAX, f"sender {text!r}")
    return address


def parse_recipient(text: str) -> Address:
    address = parse(text)
    if address is None:
        raise replies.Rejected(replies.BAD_RECIPIENT_SYNTAX, f"recipient {text!r}")
    return address
