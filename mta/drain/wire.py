"""The handoff request: one message with its full queue state, signed.

``POST /v1/handoff`` with a body of the record's versioned JSON (the same
as the spool's metadata file: recipients with their state and last reply,
attempts, created, next attempt, expiry), a newline, then the raw message.
The body has a ``Content-Length`` (no chunked encoding), so its size is
known before any of it is read.

What is signed travels in headers, so a receiver can refuse a request
before it reads the body: ``X-Kubemta-Timestamp`` (the sender's Unix time),
``X-Kubemta-Target`` (the name of the pod the request is meant for),
``X-Kubemta-Nonce`` (random, once per request), ``X-Kubemta-Body-SHA256``
(of the body).  ``X-Kubemta-Signature`` is HMAC-SHA256 with the pods' shared
secret over ``kubemta-handoff-v2``, the timestamp, the target, the nonce,
the body's length and its SHA-256, one per line.  A receiver accepts a
timestamp at most ``MAX_SKEW`` seconds off its clock, only its own name as
target, and each nonce once (``NonceLog``); after reading the body it
checks the body against the signed hash.

Failure: ``decode``, ``verify_headers`` and ``verify_body`` raise
``WireError`` with the reason; ``NonceLog.add`` raises ``ReplayError``
(a ``WireError``) for a nonce seen in the window, ``NonceLogFull`` when it
holds ``max_entries`` nonces still in their window (it refuses rather than
forget one that could then be replayed).
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Mapping
from pathlib import Path

from spool.record import Record, RecordError, loads

PATH = "/v1/handoff"
TIMESTAMP = "X-Kubemta-Timestamp"
TARGET = "X-Kubemta-Target"
NONCE = "X-Kubemta-Nonce"
BODY_SHA256 = "X-Kubemta-Body-SHA256"
SIGNATURE = "X-Kubemta-Signature"
CONTENT_TYPE = "application/vnd.kubemta.handoff"
VERSION = "kubemta-handoff-v2"
MAX_SKEW = 300
# Nonces remembered at once: at the drain's pace (one request at a time per
# leaving pod) far more than a replay window's worth; about 100 bytes each.
MAX_NONCES = 100_000
_NONCE = re.compile(r"^[0-9a-f]{32}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class WireError(ValueError):
    pass


class ReplayError(WireError):
    pass


class NonceLogFull(Exception):
    """More signed requests in one window than the log may remember."""


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


def _mac(secret: bytes, timestamp: str, target: str, nonce: str, length: int, digest: str) -> str:
    text = "\n".join((VERSION, timestamp, target, nonce, str(length), digest))
    return hmac.new(secret, text.encode(), hashlib.sha256).hexdigest()


def sign(secret: bytes, body: bytes, target: str, now: float | None = None,
         nonce: str | None = None) -> dict[str, str]:
    """The headers of a request carrying ``body`` to the pod named ``target``."""
    timestamp = str(int(time.time() if now is None else now))
    nonce = nonce or secrets.token_hex(16)
    digest = hashlib.sha256(body).hexdigest()
    return {TIMESTAMP: timestamp, TARGET: target, NONCE: nonce, BODY_SHA256: digest,
            SIGNATURE: _mac(secret, timestamp, target, nonce, len(body), digest), "Content-Type": CONTENT_TYPE}


def verify_headers(secret: bytes, headers: Mapping[str, str], length: int, me: str,
                   now: float | None = None) -> str:
    """Check what is signed, before the body is read; returns the nonce (for ``NonceLog``)."""
    timestamp, target = headers.get(TIMESTAMP), headers.get(TARGET)
    nonce, digest, signature = headers.get(NONCE), headers.get(BODY_SHA256), headers.get(SIGNATURE)
    if not timestamp or not signature or not timestamp.isdigit() or target is None:
        raise WireError("unsigned request")
    if not nonce or not _NONCE.match(nonce) or not digest or not _HEX64.match(digest):
        raise WireError("unsigned request")
    if abs((time.time() if now is None else now) - int(timestamp)) > MAX_SKEW:
        raise WireError("timestamp too far from this clock")
    if not hmac.compare_digest(_mac(secret, timestamp, target, nonce, length, digest), signature):
        raise WireError("bad signature")
    if target != me:
        raise WireError(f"signed for pod {target!r}, this is {me!r}")
    return nonce


def verify_body(headers: Mapping[str, str], body: bytes) -> None:
    if not hmac.compare_digest(hashlib.sha256(body).hexdigest(), headers.get(BODY_SHA256, "")):
        raise WireError("the body is not the one signed")


class NonceLog:
    """The nonces of signed requests within the replay window (``2 * MAX_SKEW``), each refused a second time."""

    def __init__(self, max_entries: int = MAX_NONCES, window: float = 2 * MAX_SKEW) -> None:
        self.max_entries = max_entries
        self.window = window
        self._seen: collections.OrderedDict[str, float] = collections.OrderedDict()  # nonce -> when, oldest first

    def add(self, nonce: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        while self._seen:
            oldest, when = next(iter(self._seen.items()))
            if now - when <= self.window:
                break
            del self._seen[oldest]
        if nonce in self._seen:
            raise ReplayError("replayed request (nonce already used)")
        if len(self._seen) >= self.max_entries:
            raise NonceLogFull(f"{self.max_entries} handoffs in {self.window:.0f} s")
        self._seen[nonce] = now

    def __len__(self) -> int:
        return len(self._seen)
