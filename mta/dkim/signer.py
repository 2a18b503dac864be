"""Sign outgoing messages with DKIM, relaxed/relaxed, From oversigned.

dkimpy does the canonicalisation, header selection and folding; the
signature itself is computed by OpenSSL (``cryptography``), which is about
ten times faster than dkimpy's pure-Python RSA and gives byte-identical
signatures (RSASSA-PKCS1-v1_5 is deterministic).  The signing domain is the
``From:`` domain, or the nearest parent that has keys (``mta.domains``),
else the configured fallback; every key of that domain signs (RSA and
Ed25519: dual signing).

Failure: ``SigningError`` for a message it cannot sign (a header dkimpy
cannot parse) or a key that fails; the courier bounces the message rather
than send it unsigned when a key is configured for it.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Iterable
from email.utils import getaddresses

import dkim
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding
from dkim.canonicalization import CanonicalizationPolicy, correct_empty_body, strip_trailing_lines

from mta.dkim.keys import SigningKey
from mta.domains import DomainMap

# RFC 6376 §5.4.1's list, less what is often rewritten in transit.
SIGNED_HEADERS = (b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"reply-to", b"in-reply-to",
                  b"references", b"mime-version", b"content-type", b"content-transfer-encoding",
                  b"list-unsubscribe", b"list-unsubscribe-post")
CANON = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
HEADER_NAME = b"DKIM-Signature"


class SigningError(Exception):
    pass


def include_headers(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    """Present headers to sign, each once more than it occurs (oversigning:
    nobody can add another instance later without breaking the signature)."""
    present = [name.lower() for name, _ in headers]
    out: list[bytes] = []
    for name in SIGNED_HEADERS:
        count = present.count(name)
        if count or name == b"from":
            out.extend([name] * (count + 1))
    return out


class _Collect:
    """What ``dkim.hash_headers`` feeds a hasher, kept as bytes for OpenSSL."""

    def __init__(self) -> None:
        self.data = bytearray()

    def update(self, data: bytes) -> None:
        self.data.extend(data)


def _signature(key: SigningKey, raw: bytes) -> bytes:
    if isinstance(key.key, ed25519.Ed25519PrivateKey):
        # RFC 8463: Ed25519 signs the SHA-256 hash of the data.
        return key.key.sign(hashlib.sha256(raw).digest())
    return key.key.sign(raw, padding.PKCS1v15(), hashes.SHA256())


Headers = list[tuple[bytes, bytes]]


def parse(message: bytes) -> tuple[Headers, bytes]:
    """``dkim.rfc822_parse``'s (headers, body), without splitting the body
    into lines and joining it again when the message has CRLF line endings."""
    end = message.find(b"\r\n\r\n")
    if end < 0 or message.startswith(b"\r\n") or message.count(b"\n") != message.count(b"\r\n"):
        return dkim.rfc822_parse(message)  # type: ignore[no-any-return]
    headers, _ = dkim.rfc822_parse(message[:end + 4])
    return headers, message[end + 4:]


def canonical_body(body: bytes) -> bytes:
    """Relaxed body canonicalisation (RFC 6376 §3.4.4), as dkimpy does it.

    dkimpy runs two regular expressions over the whole body; when the body
    has no tab, no double space and no space before a line end they change
    nothing, and only the trailing empty lines are left to remove.
    """
    if b"\t" in body or b"  " in body or b" \r\n" in body:
        return CANON.canonicalize_body(body)  # type: ignore[no-any-return]
    return correct_empty_body(strip_trailing_lines(body))  # type: ignore[no-any-return]


def signature_header(parsed: tuple[Headers, bytes], key: SigningKey, now: int | None = None) -> bytes:
    """The ``DKIM-Signature: ...\\r\\n`` field for a ``parse``d message with ``key``."""
    headers, body = parsed
    include = include_headers(headers)
    algorithm = b"ed25519-sha256" if key.kind == "ed25519" else b"rsa-sha256"
    body_hash = base64.b64encode(hashlib.sha256(canonical_body(body)).digest())
    domain = key.domain.encode("ascii")
    fields = [
        (b"v", b"1"),
        (b"a", algorithm),
        (b"c", CANON.to_c_value()),
        (b"d", domain),
        (b"i", b"@" + domain),
        (b"q", b"dns/txt"),
        (b"s", key.selector.encode("ascii")),
        (b"t", str(int(time.time()) if now is None else now).encode("ascii")),
        (b"h", b" : ".join(include)),
        (b"bh", body_hash),
        # dkimpy's trick: a long b= placeholder forces b= onto its own line,
        # so filling it in does not change how the other tags fold.
        (b"b", b"0" * 60),
    ]
    value = dkim.fold(b"; ".join(b"=".join(f) for f in fields), namelen=len(HEADER_NAME), linesep=b"\r\n")
    value = dkim.RE_BTAG.sub(b"\\1", value)
    hashed = _Collect()
    dkim.hash_headers(hashed, CANON, CANON.canonicalize_headers(headers), include,
                      (HEADER_NAME, b" " + value), dict(fields))
    signature = _signature(key, bytes(hashed.data))
    fields[-1] = (b"b", base64.b64encode(signature))
    final = dkim.fold(b"; ".join(b"=".join(f) for f in fields) + b"\r\n", namelen=len(HEADER_NAME),
                      linesep=b"\r\n")
    return HEADER_NAME + b": " + final


def from_domain(headers: Headers) -> str | None:
    values = [v.decode("utf-8", "replace") for name, v in headers if name.lower() == b"from"]
    addresses = [addr for _, addr in getaddresses(values) if "@" in addr]
    return addresses[0].rpartition("@")[2].lower().rstrip(".") if addresses else None


class Signer:
    def __init__(self, keys: Iterable[SigningKey], fallback_domain: str | None = None) -> None:
        self.keys: dict[str, list[SigningKey]] = {}
        for key in keys:
            self.keys.setdefault(key.domain, []).append(key)
        self.fallback = fallback_domain.lower() if fallback_domain else None
        # A domain's keys sign for it and every name below it; the nearest wins.
        self._signing_domains: DomainMap[list[SigningKey]] = DomainMap()
        for domain, domain_keys in self.keys.items():
            self._signing_domains.add(domain, domain_keys)
            self._signing_domains.add(f"*.{domain}", domain_keys)
        if self.fallback:
            self._signing_domains.add("*", self.keys.get(self.fallback, []))

    def keys_for(self, headers: Headers) -> list[SigningKey]:
        return self._signing_domains.lookup(from_domain(headers) or "") or []

    def sign(self, message: bytes, now: int | None = None) -> bytes:
        """The message with its signatures prepended (unchanged if no key applies)."""
        if not self.keys:
            return message  # nothing to sign with: do not even parse the header
        try:
            parsed = parse(message)
        except Exception as exc:  # dkimpy raises several kinds for a header it cannot read
            raise SigningError(f"DKIM signing failed: the header cannot be parsed: {exc}") from exc
        keys = self.keys_for(parsed[0])
        if not keys:
            return message
        try:
            fields = []
            for key in keys:
                key.refresh()
                fields.append(signature_header(parsed, key, now))
        except Exception as exc:
            raise SigningError(f"DKIM signing for {keys[0].domain} failed: {exc}") from exc
        return b"".join(fields) + message
