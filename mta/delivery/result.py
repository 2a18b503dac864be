"""The result of a delivery attempt for one recipient."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum


class Kind(Enum):
    DELIVERED = "delivered"
    TRANSIENT = "transient"  # try again later
    PERMANENT = "permanent"  # never: bounce


_ENHANCED = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")


@dataclass(frozen=True)
class Outcome:
    kind: Kind
    reply: str  # "550 5.1.1 <x@y>: user unknown", or our own wording
    remote: str | None = None  # "mx.example.com[192.0.2.1]" when a server answered

    @property
    def enhanced(self) -> str:
        """The enhanced status code, from the reply or a default for the kind."""
        match = _ENHANCED.search(self.reply)
        if match:
            return match.group(0)
        return {Kind.DELIVERED: "2.0.0", Kind.TRANSIENT: "4.0.0", Kind.PERMANENT: "5.0.0"}[self.kind]


def delivered(reply: str, remote: str | None) -> Outcome:
    return Outcome(Kind.DELIVERED, reply, remote)


def transient(reply: str, remote: str | None = None) -> Outcome:
    return Outcome(Kind.TRANSIENT, reply, remote)


def permanent(reply: str, remote: str | None = None) -> Outcome:
    return Outcome(Kind.PERMANENT, reply, remote)


def from_reply(code: int, text: str, remote: str | None) -> Outcome:
    """Classify a server's reply by its first digit."""
    reply = f"{code} {text}".strip()
    if 200 <= code < 300:
        return delivered(reply, remote)
    if 500 <= code < 600:
        return permanent(reply, remote)
    return transient(reply, remote)
