"""A smart host (an ESP's submission service) for relay tests.

Postfix's smtp-sink cannot do AUTH, so this is a real SMTP server built on
aiosmtpd, run in its own thread: STARTTLS (or implicit TLS) with a
certificate from a ``trustme`` test CA, AUTH PLAIN/LOGIN against one
username and password (or a few), and every accepted message kept with the user that
sent it and when it arrived.  It also plays an email service provider: the message-size
limit it announces in EHLO SIZE (``size_limit``), and a sending rate (``rate``: at most N
messages in any window of S seconds) past which it answers the provider's throttling
reply (``throttle_reply``) and counts it.  With ``events_url`` it also POSTs a delivery event
for each accepted message in SendGrid's Event Webhook format (a JSON array of events with
``email``, ``event: delivered``, ``smtp-id``, ``timestamp``), as a provider tells its sender.
Failure: ``start`` raises if the port does not answer.
"""

from __future__ import annotations

import email.parser
import json
import ssl
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session


@dataclass
class RelayedMessage:
    sender: str
    recipients: list[str]
    data: bytes
    user: str | None
    tls: bool
    arrived: float = 0.0  # time.monotonic() when DATA ended


class _Handler:
    def __init__(self, owner: SmartHost) -> None:
        self.owner = owner

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        owner = self.owner
        now = time.monotonic()
        with owner.lock:
            if owner.rate is not None:
                count, span = owner.rate
                if sum(1 for m in owner.received if now - m.arrived <= span) >= count:
                    owner.throttled += 1
                    return owner.throttle_reply
            owner.received.append(RelayedMessage(
                envelope.mail_from or "", list(envelope.rcpt_tos), envelope.original_content or b"",
                session.auth_data.login.decode() if isinstance(session.auth_data, LoginPassword) else None,
                session.ssl is not None, now))
        if owner.events_url is not None:
            threading.Thread(target=owner.post_events, args=(envelope,), daemon=True).start()
        return "250 2.0.0 accepted by the smart host"


class SmartHost:
    def __init__(self, host: str, port: int, workdir: Path, *, user: str, password: str,
                 implicit_tls: bool = False, more_users: dict[str, str] | None = None,
                 size_limit: int | None = None, rate: tuple[int, float] | None = None,
                 throttle_reply: str = "421 4.7.0 too many messages, slow down",
                 events_url: str | None = None) -> None:
        self.events_url = events_url
        self.events_posted = 0
        self.size_limit, self.rate, self.throttle_reply = size_limit, rate, throttle_reply
        self.throttled = 0
        self.host, self.port = host, port
        self.user, self.password = user, password
        self.accounts = {user: password, **(more_users or {})}
        self.implicit_tls = implicit_tls
        self.received: list[RelayedMessage] = []
        self.failed_logins = 0
        self.lock = threading.Lock()
        ca = trustme.CA()
        cert = ca.issue_cert(host, "localhost")
        self.ca_file = workdir / "smarthost-ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert.configure_cert(self.context)
        self.controller: Controller | None = None

    def post_events(self, envelope: Envelope) -> None:
        """The provider's delivery events for one message, after a moment (it delivered it)."""
        time.sleep(0.2)
        data = envelope.original_content or b""
        headers = email.parser.BytesHeaderParser().parsebytes(data)
        events = [{"email": rcpt, "event": "delivered", "smtp-id": headers.get("Message-ID", ""),
                   "timestamp": int(time.time()), "sg_event_id": f"ev-{n}", "response": "250 OK"}
                  for n, rcpt in enumerate(envelope.rcpt_tos)]
        assert self.events_url is not None
        request = urllib.request.Request(self.events_url, data=json.dumps(events).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10), self.lock:
            self.events_posted += 1

    def _authenticate(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                      auth_data: Any) -> AuthResult:
        ok = (isinstance(auth_data, LoginPassword)
              and self.accounts.get(auth_data.login.decode()) == auth_data.password.decode())
        if not ok:
            with self.lock:
                self.failed_logins += 1
        return AuthResult(success=ok, handled=False, auth_data=auth_data)

    def start(self) -> None:
        kwargs: dict[str, Any] = {"authenticator": self._authenticate, "auth_required": True,
                                  "auth_require_tls": True, "ready_timeout": 10}
        if self.size_limit is not None:
            kwargs["data_size_limit"] = self.size_limit
        if self.implicit_tls:
            kwargs["ssl_context"] = self.context
            # aiosmtpd only counts STARTTLS as TLS; here the whole session is TLS.
            kwargs["auth_require_tls"] = False
        else:
            kwargs["tls_context"] = self.context
            kwargs["require_starttls"] = True
        self.controller = Controller(_Handler(self), hostname=self.host, port=self.port, **kwargs)
        self.controller.start()

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None
