"""Queue ids: unique across pods and shards, sortable by arrival time."""

from __future__ import annotations

import secrets
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32, no I L O U: ascending, so ids sort by time
ID_TIME = 10  # the time prefix's characters
ID_LENGTH = 20


def _b32(value: int, width: int) -> str:
    out = []
    for _ in range(width):
        out.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(out))


def new_id(now: float | None = None) -> str:
    """A 20-character id: 10 of microsecond time, 10 of randomness (50 bits)."""
    micros = int((time.time() if now is None else now) * 1_000_000)
    return _b32(micros, 10) + _b32(secrets.randbits(50), 10)


def cutoff() -> str:
    """The time prefix of an id made now: ``since`` tells ids made from now on."""
    return new_id()[:ID_TIME]


def since(record_id: str, prefix: str) -> bool:
    """Whether ``record_id`` is a queue id made at or after the time of ``prefix`` (``cutoff``)."""
    return len(record_id) == ID_LENGTH and record_id[:ID_TIME] >= prefix
