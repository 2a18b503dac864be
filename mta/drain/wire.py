"""The handoff request: one message with its full queue state, signed.

``POST /v1/handoff`` with a body of the record's versioned JSON (the same
as the spool's metadata file: recipients with their state and last reply,
attempts, created, next attempt, expiry), a newline, then the raw message.
``X-Kubemta-Timestamp`` is the sender's Unix time; ``X-Kubemta-Signature``
is HMAC-SHA256 with the pods' shared secret over the timestamp, a newline
and the SHA-256 of the body.  A receiver accepts a timestamp at most
``MAX_SKEW`` seconds off its clock.

Failure: ``decode`` and ``verify`` raise ``WireError`` with the reason.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from pathlib import Path

from spool.record import Record, RecordError, loads

PATH = "/v1/handoff"
TIMESTAMP = "X-Kubemta-Timestamp"
SIGNATURE = "X-Kubemta-Signature"
CONTENT_TYPE = "application/vnd.kubemta.handoff"
MAX_SKEW = 300


class WireError(ValueError):
    pass


def read_secret(path: Path) -> bytes:
    secret = path.read_bytes().strip()
    if len(secret) < 16:
        raise WireError(f"{path}: the handoff secret must be at least 16 bytes")
    return secret


def encode(record: Record, message: bytes) -> bytes:
    return record.dumps() + b"\n" + message


def decode(body: bytes) -> tuple[Record, bytes]:
    meta, sep, message = body.partition(b"\n")
    if not sep:
        raise WireError("no metadata line")
    try:
        record = loads(meta)
    except RecordError as exc:
        raise WireError(f"bad record: {exc}") from None
    if record.size != len(message):
        raise WireError(f"message has {len(message)} bytes, the record says {record.size}")
    return record, message


def _mac(secret: bytes, timestamp: str, body: bytes) -> str:
    digest = hashlib.sha256(body).hexdigest()
    return hmac.new(secret, f"{timestamp}\n{digest}".encode(), hashlib.sha256).hexdigest()


def sign(secret: bytes, body: bytes, now: float | None = None) -> dict[str, str]:
    timestamp = str(int(time.time() if now is None else now))
    return {TIMESTAMP: timestamp, SIGNATURE: _mac(secret, timestamp, body), "Content-Type": CONTENT_TYPE}


def verify(secret: bytes, body: bytes, timestamp: str | None, signature: str | None,
           now: float | None = None) -> None:
    if not timestamp or not signature or not timestamp.isdigit():
        raise WireError("unsigned request")
    if abs((time.time() if now is None else now) - int(timestamp)) > MAX_SKEW:
        raise WireError("timestamp too far from this clock")
    if not hmac.compare_digest(_mac(secret, timestamp, body), signature):
        raise WireError("bad signature")
