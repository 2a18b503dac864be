"""Email service providers posting their event webhooks, as each one documents them.

No provider can run here, so these play the provider's side of the wire:
the JSON each one posts, its headers and its proof, made with real keys:

- ``SendGrid``: a P-256 key; the console's verification key (base64 DER)
  is ``public_key_text``; each post carries
  ``X-Twilio-Email-Event-Webhook-Signature`` (ECDSA over timestamp + body)
  and ``-Timestamp``;
- ``Mailgun``: the webhook signing key; ``signature`` holds timestamp,
  token and the HMAC-SHA256 hex;
- ``Sns``: an HTTPS server (aiohttp, a trustme certificate for 127.0.0.1)
  serving an RSA signing certificate at ``cert_url`` and a SubscribeURL
  that records the tokens confirmed; ``publish`` posts a real SNS message
  (``Notification``, ``SubscriptionConfirmation``), signed with
  SignatureVersion 1 (SHA1) or 2 (SHA256) over SNS's canonical string, with
  SNS's ``x-amz-sns-*`` headers;
- ``Postmark``: basic auth, as put in the webhook's URL.

``post`` returns (status, parsed JSON body) of kubemta's answer.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import secrets
import ssl
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from mta.feedback.esp_auth import sns_string_to_sign
from tests.peers.webthread import ThreadedWebApp


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


class SendGrid:
    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        der = self.key.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
        self.public_key_text = base64.b64encode(der).decode()

    def post(self, url: str, events: list[dict[str, Any]], *, timestamp: int | None = None,
             key: ec.EllipticCurvePrivateKey | None = None) -> tuple[int, Any]:
        body = json.dumps(events).encode()
        stamp = str(int(time.time()) if timestamp is None else timestamp)
        signature = (key or self.key).sign(stamp.encode() + body, ec.ECDSA(hashes.SHA256()))
        return post(url, body, {"Content-Type": "application/json", "User-Agent": "SendGrid Event API",
                                "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
                                "X-Twilio-Email-Event-Webhook-Timestamp": stamp})


def sendgrid_event(name: str, address: str, **fields: Any) -> dict[str, Any]:
    return {"email": address, "timestamp": int(time.time()), "smtp-id": f"<{uuid.uuid4().hex}@app.test>",
            "event": name, "category": ["transactional"], "sg_event_id": secrets.token_urlsafe(16),
            "sg_message_id": f"{secrets.token_urlsafe(16)}.filterdrecv-p3las1-1-0", **fields}


class Mailgun:
    def __init__(self) -> None:
        self.key = "key-" + secrets.token_hex(16)

    def signature(self, timestamp: int | None = None, token: str | None = None,
                  key: str | None = None) -> dict[str, str]:
        stamp = str(int(time.time()) if timestamp is None else timestamp)
        token = token or secrets.token_hex(25)
        digest = hmac.new((key or self.key).encode(), (stamp + token).encode(), hashlib.sha256).hexdigest()
        return {"timestamp": stamp, "token": token, "signature": digest}

    def post(self, url: str, event_data: dict[str, Any], signature: dict[str, str] | None = None
             ) -> tuple[int, Any]:
        body = json.dumps({"signature": signature or self.signature(), "event-data": event_data}).encode()
        return post(url, body, {"Content-Type": "application/json", "User-Agent": "mailgun/treq-16.12.0"})


def mailgun_event(name: str, address: str, **fields: Any) -> dict[str, Any]:
    return {"event": name, "id": secrets.token_urlsafe(16), "timestamp": time.time(), "log-level": "error",
            "recipient": address, "recipient-domain": address.rpartition("@")[2],
            "message": {"headers": {"to": address, "message-id": f"{uuid.uuid4().hex}@mg.app.test",
                                    "from": "App <news@app.test>", "subject": "Hello"}, "attachments": [],
                        "size": 2048},
            "user-variables": {}, "flags": {"is-test-mode": False}, **fields}


class Postmark:
    def __init__(self) -> None:
        self.user, self.password = "postmark", secrets.token_urlsafe(18)

    def post(self, url: str, record: dict[str, Any], *, password: str | None = None) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json", "User-Agent": "Postmark"}
        if password != "":
            auth = f"{self.user}:{self.password if password is None else password}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(auth).decode()
        return post(url, json.dumps(record).encode(), headers)


class Sns(ThreadedWebApp):
    """The SNS side of an HTTPS subscription, and the web server that serves its signing certificate."""

    what = "fake SNS"

    def __init__(self, tls: ssl.SSLContext, host: str = "127.0.0.1") -> None:
        super().__init__(tls, host)
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.us-east-1.amazonaws.com")])
        now = dt.datetime.now(dt.UTC)
        self.certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
                            .sign(self.key, hashes.SHA256()))
        self.confirmed: list[str] = []  # tokens whose SubscribeURL was visited
        self.fetched = 0  # certificate downloads

    @property
    def cert_url(self) -> str:
        return f"https://{self.host}:{self.port}/SimpleNotificationService-{self.port}.pem"

    async def _cert(self, request: web.Request) -> web.Response:
        self.fetched += 1
        return web.Response(body=self.certificate.public_bytes(serialization.Encoding.PEM),
                            content_type="application/x-pem-file")

    async def _confirm(self, request: web.Request) -> web.Response:
        self.confirmed.append(request.query.get("Token", ""))
        return web.Response(text="<ConfirmSubscriptionResponse/>", content_type="text/xml")

    def message(self, topic: str, kind: str, body: str, *, version: str = "1", cert_url: str | None = None,
                key: rsa.RSAPrivateKey | None = None) -> dict[str, Any]:
        message: dict[str, Any] = {"Type": kind, "MessageId": str(uuid.uuid4()), "TopicArn": topic,
                                   "Message": body,
                                   "Timestamp": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
                                   "SignatureVersion": version, "SigningCertURL": cert_url or self.cert_url}
        if kind == "Notification":
            message["Subject"] = "Amazon SES Email Event Notification"
            message["UnsubscribeURL"] = f"https://{self.host}:{self.port}/?Action=Unsubscribe"
        else:
            token = secrets.token_hex(32)
            message["Token"] = token
            message["SubscribeURL"] = (f"https://{self.host}:{self.port}/confirm?Action=ConfirmSubscription"
                                       f"&TopicArn={topic}&Token={token}")
        algorithm = hashes.SHA1() if version == "1" else hashes.SHA256()
        signature = (key or self.key).sign(sns_string_to_sign(message), padding.PKCS1v15(), algorithm)
        message["Signature"] = base64.b64encode(signature).decode()
        return message

    def post(self, url: str, message: dict[str, Any]) -> tuple[int, Any]:
        return post(url, json.dumps(message).encode(), {
            "Content-Type": "text/plain; charset=UTF-8", "User-Agent": "Amazon Simple Notification Service Agent",
            "x-amz-sns-message-type": message["Type"], "x-amz-sns-message-id": message["MessageId"],
            "x-amz-sns-topic-arn": message["TopicArn"]})

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/confirm", self._confirm)
        app.router.add_get(f"/SimpleNotificationService-{self.port}.pem", self._cert)
