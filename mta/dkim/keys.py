"""DKIM private keys: loaded from PEM files, reloaded when the files change.

Keys are PEM, PKCS#1 (``BEGIN RSA PRIVATE KEY``, as ``opendkim-genkey``
writes) or PKCS#8 (``BEGIN PRIVATE KEY``, as ``openssl genpkey`` writes);
the type (RSA or Ed25519) is read from the key itself.  Also generates
keys, writes new key files (atomically and durably, never over an existing
file: ``spool.safeio``) and builds the DNS TXT record that publishes a
key's public half.

Failure: ``DkimKeyError`` naming the file and the reason.  At start that
stops the server; later, a key file that stops loading keeps the previous
key and logs why (a half-written Secret update must not break signing).
``write_private_key`` raises ``FileExistsError`` when the file exists and
``OSError`` when it cannot write; either way no partial key file is left.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mta.domains import normalise
from spool.safeio import write_file

log = logging.getLogger(__name__)

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
KEY_FILE_MODE = 0o600  # a private key: the owner only


class DkimKeyError(Exception):
    pass


def load_private_key(path: Path) -> PrivateKey:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DkimKeyError(f"{path}: cannot read DKIM key: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise DkimKeyError(f"{path}: not a PEM private key (PKCS#1 or PKCS#8): {exc}") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 1024:
            raise DkimKeyError(f"{path}: RSA key of {key.key_size} bits is too short (RFC 8301: at least 1024)")
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    raise DkimKeyError(f"{path}: unsupported key type {type(key).__name__}; use RSA or Ed25519")


def key_type(key: PrivateKey) -> str:
    return "rsa" if isinstance(key, rsa.RSAPrivateKey) else "ed25519"


def public_value(key: PrivateKey) -> str:
    """The ``p=`` value: SubjectPublicKeyInfo for RSA, the raw key for Ed25519 (RFC 8463)."""
    public = key.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        raw = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(raw).decode("ascii")


def txt_record(key: PrivateKey) -> str:
    return f"v=DKIM1; k={key_type(key)}; p={public_value(key)}"


def generate(kind: str, bits: int = 2048) -> PrivateKey:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=bits)
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise DkimKeyError(f"unknown key type {kind!r}; use rsa or ed25519")


def write_private_key(key: PrivateKey, path: Path) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    # Exclusive: replacing a key whose public half is published would break every signature.
    write_file(Path(path), pem, KEY_FILE_MODE, exclusive=True)


@dataclass
class SigningKey:
    """One (domain, selector) key, kept in step with its file."""

    domain: str
    selector: str
    path: Path
    key: PrivateKey
    stamp: tuple[float, int]

    @classmethod
    def load(cls, domain: str, selector: str, path: Path) -> SigningKey:
        key = load_private_key(path)
        stat = Path(path).stat()
        # d= is the ASCII (xn--) spelling of the domain (RFC 6376 §3.5).
        return cls(normalise(domain), selector, Path(path), key, (stat.st_mtime, stat.st_size))

    @property
    def kind(self) -> str:
        return key_type(self.key)

    def refresh(self) -> None:
        try:
            stat = self.path.stat()
            if (stat.st_mtime, stat.st_size) == self.stamp:
                return
            self.key = load_private_key(self.path)
            self.stamp = (stat.st_mtime, stat.st_size)
            log.info("DKIM key %s for %s reloaded", self.selector, self.domain)
        except (OSError, DkimKeyError) as exc:
            log.error("DKIM key %s for %s not reloaded, keeping the previous one: %s", self.selector,
                      self.domain, exc)
