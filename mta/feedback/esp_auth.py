"""Who posted an ESP event: each provider's own proof, checked before anything is acted on.

- **SendGrid**, the Signed Event Webhook: an ECDSA (P-256, SHA-256)
  signature over the ``X-Twilio-Email-Event-Webhook-Timestamp`` header
  followed by the raw body, in ``X-Twilio-Email-Event-Webhook-Signature``,
  checked with the verification key from the console;
- **Mailgun**: ``signature.signature`` is the hex HMAC-SHA256, under the
  webhook signing key, of ``signature.timestamp`` followed by
  ``signature.token``; a token seen before is a replay;
- **Amazon SNS** (SES notifications): the message's ``Signature`` (RSA,
  SHA1 for ``SignatureVersion`` 1, SHA256 for 2) over SNS's canonical
  string, checked with the certificate at ``SigningCertURL`` -- fetched
  only over HTTPS from a host matching ``cert_hosts``, so a forger cannot
  bring their own -- and only from the configured topics; a message id seen
  before is a retry;
- **Postmark** has no signature: HTTP basic auth with the credentials put
  in the webhook's URL, compared in constant time.

SendGrid and Mailgun timestamps older than ``max_age`` (or as far in the
future) are refused: a captured request cannot be replayed later.

Failure: ``Forged`` (the endpoint answers 401 and logs why); a
certificate that cannot be fetched is ``CertificateUnavailable`` (503, the
provider retries).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"
SEEN = 10_000  # remembered tokens and message ids: more than a provider retries within max_age


class Forged(Exception):
    """The request does not prove it comes from the provider; the text says why."""


class CertificateUnavailable(Exception):
    """The SNS signing certificate could not be fetched (the provider retries)."""


class Seen:
    """A bounded memory of ids already acted on, oldest forgotten first.

    An id is added only once its event was acted on: a request answered 503
    is retried by the provider with the same id, and must be taken then."""

    def __init__(self, size: int = SEEN) -> None:
        self.size, self.ids = size, OrderedDict[str, None]()

    def __contains__(self, key: str) -> bool:
        return key in self.ids

    def add(self, key: str) -> None:
        self.ids[key] = None
        if len(self.ids) > self.size:
            self.ids.popitem(last=False)


def _fresh(timestamp: str, max_age: float, now: float) -> None:
    try:
        age = now - float(timestamp)
    except ValueError:
        raise Forged(f"timestamp {timestamp[:40]!r} is not a number") from None
    if abs(age) > max_age:
        raise Forged(f"timestamp is {int(age)} s old, more than {int(max_age)} s apart from now")


class SendgridSignature:
    def __init__(self, key_text: bytes, max_age: float, clock: Callable[[], float] = time.time) -> None:
        """``key_text``: the verification key as the console shows it (base64 DER) or PEM; ``ValueError`` if not."""
        text = key_text.strip()
        try:
            key = serialization.load_pem_public_key(text) if text.startswith(b"-----BEGIN") else \
                serialization.load_der_public_key(base64.b64decode(text, validate=True))
        except (ValueError, binascii.Error) as exc:
            raise ValueError(f"not an ECDSA public key: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise ValueError("not an ECDSA public key")
        self.key, self.max_age, self.clock = key, max_age, clock

    def check(self, headers: Mapping[str, str], body: bytes) -> None:
        signature, timestamp = headers.get(SIGNATURE_HEADER), headers.get(TIMESTAMP_HEADER)
        if not signature or not timestamp:
            raise Forged(f"no {SIGNATURE_HEADER} or {TIMESTAMP_HEADER} header")
        _fresh(timestamp, self.max_age, self.clock())
        try:
            self.key.verify(base64.b64decode(signature, validate=True), timestamp.encode() + body,
                            ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, binascii.Error, ValueError):
            raise Forged("the signature does not verify with the configured key") from None


class MailgunSignature:
    def __init__(self, key: bytes, max_age: float, clock: Callable[[], float] = time.time) -> None:
        self.key, self.max_age, self.clock = key.strip(), max_age, clock
        self.tokens = Seen()

    def check(self, document: Any) -> str:
        """The request's token (for ``tokens.add`` once acted on); ``Forged`` if it proves nothing."""
        signature = document.get("signature") if isinstance(document, dict) else None
        if not isinstance(signature, dict):
            raise Forged("no signature object")
        timestamp, token, given = (str(signature.get(k) or "") for k in ("timestamp", "token", "signature"))
        if not timestamp or not token or not given:
            raise Forged("signature needs timestamp, token and signature")
        _fresh(timestamp, self.max_age, self.clock())
        expected = hmac.new(self.key, (timestamp + token).encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, given.lower()):
            raise Forged("the signature does not match the signing key")
        if token in self.tokens:
            raise Forged("the token was used before: a replay")
        return token


# SNS's canonical string: these keys, in this order, each as "Key\nValue\n" (Subject only when present).
_SNS_KEYS = {
    "Notification": ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"),
    "SubscriptionConfirmation": ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"),
    "UnsubscribeConfirmation": ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"),
}
_SNS_HASHES = {"1": hashes.SHA1, "2": hashes.SHA256}


def sns_string_to_sign(message: Mapping[str, Any]) -> bytes:
    """The bytes SNS signs for ``message`` (``Forged`` for a message type SNS does not send)."""
    keys = _SNS_KEYS.get(str(message.get("Type")))
    if keys is None:
        raise Forged(f"Type {str(message.get('Type'))[:40]!r} is not an SNS message type")
    return "".join(f"{key}\n{message[key]}\n" for key in keys if key in message).encode()


class SnsSignature:
    def __init__(self, topic_arns: list[str], cert_hosts: str, fetch: Callable[[str], Awaitable[bytes]]) -> None:
        """``fetch(url)``: the body at an HTTPS URL (raises ``CertificateUnavailable``)."""
        self.topics, self.hosts, self.fetch = set(topic_arns), re.compile(cert_hosts), fetch
        self.certificates: dict[str, rsa.RSAPublicKey] = {}
        self.messages = Seen()  # MessageIds acted on: SNS retries a message it thinks was not received

    def trusted_url(self, url: str) -> bool:
        """Only HTTPS to a host matching ``cert_hosts``: certificates, and the SubscribeURL visited."""
        parts = urlsplit(url)
        return parts.scheme == "https" and parts.hostname is not None and bool(self.hosts.match(parts.hostname))

    async def check(self, message: Mapping[str, Any]) -> None:
        if message.get("TopicArn") not in self.topics:
            raise Forged(f"topic {str(message.get('TopicArn'))[:300]!r} is not in feedback.esp.ses.topic_arns")
        algorithm = _SNS_HASHES.get(str(message.get("SignatureVersion")))
        if algorithm is None:
            raise Forged(f"SignatureVersion {str(message.get('SignatureVersion'))[:10]!r} is not 1 or 2")
        url = str(message.get("SigningCertURL") or "")
        if not self.trusted_url(url):
            raise Forged(f"SigningCertURL {url[:300]!r} is not HTTPS from a host matching feedback.esp.ses.cert_hosts")
        to_sign = sns_string_to_sign(message)
        key = await self._key(url)
        try:
            key.verify(base64.b64decode(str(message.get("Signature") or ""), validate=True), to_sign,
                       padding.PKCS1v15(), algorithm())
        except (InvalidSignature, binascii.Error, ValueError):
            raise Forged("the signature does not verify with the signing certificate") from None

    async def _key(self, url: str) -> rsa.RSAPublicKey:
        key = self.certificates.get(url)
        if key is None:
            try:
                found = x509.load_pem_x509_certificate(await self.fetch(url)).public_key()
            except ValueError as exc:
                raise CertificateUnavailable(f"{url}: not a PEM certificate: {exc}") from None
            if not isinstance(found, rsa.RSAPublicKey):
                raise Forged(f"{url}: not an RSA certificate")
            key = self.certificates[url] = found
        return key


class BasicAuth:
    def __init__(self, line: str) -> None:
        """``line``: ``user:password``; ``ValueError`` if it is not."""
        user, sep, password = line.strip().partition(":")
        if not sep or not user or not password:
            raise ValueError("the first line must be user:password")
        self.expected = base64.b64encode(f"{user}:{password}".encode()).decode()

    def check(self, headers: Mapping[str, str]) -> None:
        scheme, _, credential = (headers.get("Authorization") or "").partition(" ")
        if scheme.lower() != "basic" or not hmac.compare_digest(credential.strip().encode(), self.expected.encode()):
            raise Forged("no basic-auth credentials, or not the configured ones")
