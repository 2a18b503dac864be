"""What a client asks of delivery status notifications (RFC 3461), from MAIL and RCPT to the next hop.

Owns the DSN parameters: ``RET`` and ``ENVID`` of MAIL (``MailRequest``),
``NOTIFY`` and ``ORCPT`` of RCPT (``RecipientRequest``).  ``parse_mail`` and
``parse_recipient`` validate what a client sent and decode the xtext of
ENVID and ORCPT (RFC 3461 §4; the ``utf-8`` address type's ``\\x{HEX}``
escapes of RFC 6533 §3 too); the spool keeps the decoded values, readable,
as record attributes (``to_attrs``/``from_attrs``, absent for mail that
asked nothing); ``mail_options`` and ``rcpt_options`` encode them again for
a next hop that offers DSN.  A recipient without NOTIFY gets failure
notices only (``DEFAULT_NOTIFY``), as Postfix does.

A leaf: it imports only the reply vocabulary, so every stage may use it.
Failure: a value that breaks the grammar raises ``Rejected`` with
``501 5.5.4`` and a text naming the parameter and the rule.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from mta import replies
from mta.replies import Rejected

SUCCESS, FAILURE, DELAY, NEVER = "SUCCESS", "FAILURE", "DELAY", "NEVER"
NOTIFY_KEYWORDS = (SUCCESS, FAILURE, DELAY)
DEFAULT_NOTIFY = frozenset({FAILURE})
RET_VALUES = ("FULL", "HDRS")
MAIL_PARAMETERS = ("RET", "ENVID")
RCPT_PARAMETERS = ("NOTIFY", "ORCPT")
MAX_ENVID = 100  # characters of the xtext (RFC 3461 §4.4)
MAX_ORCPT = 500  # characters of the whole value (RFC 3461 §4.2)

_HEXCHAR = re.compile(r"\+([0-9A-Fa-f]{2})")
_UNICODE_ESCAPE = re.compile(r"\\x\{([0-9A-Fa-f]{2,6})\}")
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")


def invalid(text: str) -> Rejected:
    return Rejected(replies.dsn_parameter_invalid(text))


def xtext_decode(value: str, name: str, *, unicode: bool = False) -> str:
    """RFC 3461 §4: ``+HH`` is the octet HH, other characters from ``!`` to ``~`` stand for themselves.

    Lenient where Postfix is (lower-case hex digits, a bare ``=``), since
    legacy clients write them; a ``+`` without two hex digits or a
    character outside that range is refused.  ``unicode`` lets UTF-8
    characters stand for themselves (RFC 6533's utf-8-addr-unitext).
    """
    out: list[str] = []
    i = 0
    while i < len(value):
        char = value[i]
        if char == "+":
            match = _HEXCHAR.match(value, i)
            if match is None:
                raise invalid(f"{name} is not valid xtext: '+' must be followed by two hex digits")
            out.append(chr(int(match.group(1), 16)))
            i += 3
            continue
        if not ("!" <= char <= "~" or (unicode and ord(char) > 0x9F)):
            raise invalid(f"{name} is not valid xtext: {char!r} must be written as +{ord(char):02X}")
        out.append(char)
        i += 1
    return "".join(out)


def xtext_encode(value: str) -> str:
    return "".join(c if "!" <= c <= "~" and c not in "+=" else f"+{ord(c):02X}" for c in value)


def _printable(text: str) -> bool:
    return all(" " <= c <= "~" for c in text)


@dataclass(frozen=True)
class MailRequest:
    ret: str | None = None  # FULL or HDRS; None: not asked (failure notices return the header)
    envid: str | None = None  # decoded

    def to_attrs(self) -> dict[str, str]:
        return {k: v for k, v in (("ret", self.ret), ("envid", self.envid)) if v is not None}

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> MailRequest:
        ret, envid = attrs.get("ret"), attrs.get("envid")
        return cls(ret if ret in RET_VALUES else None, envid if isinstance(envid, str) else None)

    def mail_options(self) -> list[str]:
        options = [f"RET={self.ret}"] if self.ret else []
        if self.envid is not None:
            options.append(f"ENVID={xtext_encode(self.envid)}")
        return options


@dataclass(frozen=True)
class RecipientRequest:
    notify: frozenset[str] | None = None  # None: not asked; empty: NEVER
    orcpt: str | None = None  # "rfc822;user@example.com", the address decoded

    @property
    def notifies(self) -> frozenset[str]:
        """What the recipient gets notices for: what it asked, or failures only."""
        return DEFAULT_NOTIFY if self.notify is None else self.notify

    def to_attrs(self) -> dict[str, Any]:
        attrs: dict[str, Any] = {}
        if self.notify is not None:
            attrs["notify"] = sorted(self.notify)
        if self.orcpt is not None:
            attrs["orcpt"] = self.orcpt
        return attrs

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> RecipientRequest:
        notify, orcpt = attrs.get("notify"), attrs.get("orcpt")
        return cls(frozenset(n for n in notify if n in NOTIFY_KEYWORDS) if isinstance(notify, list) else None,
                   orcpt if isinstance(orcpt, str) else None)

    def rcpt_options(self) -> list[str]:
        options = []
        if self.notify is not None:
            keywords = [k for k in NOTIFY_KEYWORDS if k in self.notify]
            options.append(f"NOTIFY={','.join(keywords) or NEVER}")
        if self.orcpt is not None:
            kind, _, address = self.orcpt.partition(";")
            if kind.lower() == "utf-8":
                address = "".join(c if c.isascii() else f"\\x{{{ord(c):X}}}" for c in address)
            options.append(f"ORCPT={kind};{xtext_encode(address)}")
        return options


def _unique(params: Iterable[tuple[str, str]]) -> dict[str, str]:
    found: dict[str, str] = {}
    for name, value in params:
        if name in found:
            raise invalid(f"{name} given more than once")
        if not value:
            raise invalid(f"{name} needs a value")
        found[name] = value
    return found


def parse_mail(params: Iterable[tuple[str, str]]) -> MailRequest:
    """MAIL's ``(name, value)`` pairs, names upper-case, values as the client wrote them."""
    found = _unique(params)
    ret = found.get("RET")
    if ret is not None and ret.upper() not in RET_VALUES:
        raise invalid(f"RET must be FULL or HDRS, not {ret[:40]!r}")
    envid = found.get("ENVID")
    if envid is not None:
        if len(envid) > MAX_ENVID:
            raise invalid(f"ENVID is longer than {MAX_ENVID} characters")
        envid = xtext_decode(envid, "ENVID")
        if not _printable(envid):
            raise invalid("ENVID must decode to printable US-ASCII")
    return MailRequest(ret.upper() if ret else None, envid)


def parse_recipient(params: Iterable[tuple[str, str]]) -> RecipientRequest:
    """RCPT's ``(name, value)`` pairs, names upper-case, values as the client wrote them."""
    found = _unique(params)
    notify: frozenset[str] | None = None
    if "NOTIFY" in found:
        words = found["NOTIFY"].upper().split(",")
        if words == [NEVER]:
            notify = frozenset()
        elif not all(word in NOTIFY_KEYWORDS for word in words):
            raise invalid("NOTIFY must be NEVER or a comma-separated list of SUCCESS, FAILURE and DELAY")
        else:
            notify = frozenset(words)
    orcpt = found.get("ORCPT")
    if orcpt is not None:
        if len(orcpt) > MAX_ORCPT:
            raise invalid(f"ORCPT is longer than {MAX_ORCPT} characters")
        kind, sep, encoded = orcpt.partition(";")
        if not sep or not _ATOM.fullmatch(kind) or not encoded:
            raise invalid("ORCPT must be an address type, ';' and the address in xtext (rfc822;user@example.com)")
        utf8 = kind.lower() == "utf-8"
        address = xtext_decode(encoded, "ORCPT", unicode=utf8)
        if utf8:
            address = _UNICODE_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), address)
            if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in address):
                raise invalid("ORCPT must not contain control characters")
        elif not _printable(address):
            raise invalid("ORCPT must decode to printable US-ASCII")
        orcpt = f"{kind};{address}"
    return RecipientRequest(notify, orcpt)
