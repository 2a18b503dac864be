"""The synthetic probe: one tagged message through the whole path, and its arrival.

``mta probe`` submits a message over SMTP to a kubemta listener, as an app
would (STARTTLS or implicit TLS, AUTH when the listener wants it), tagged
with a random token in ``X-Kubemta-Probe:`` and the subject.  The message
takes the normal queue and route.  The probe then logs in to the mailbox
it was sent to over IMAP (standard library ``imaplib``, TLS verified) every
``poll`` seconds until it finds the token, deletes the message, and
reports the latency from the ``250`` to the arrival.  Through a provider,
arrival may instead be its delivery event: the probe listens on
``webhook.listen`` while it waits, and the first POST to ``webhook.path``
whose body holds the token (providers' events carry the Message-ID, which
holds it: SendGrid's ``smtp-id``, Postmark's ``MessageID``, Mailgun's
``message-id``) is the arrival.  With ``pushgateway``
set the result goes to a Prometheus Pushgateway (``kubemta_probe_success``,
``kubemta_probe_latency_seconds``, ``kubemta_probe_last_run_timestamp_seconds``,
grouped by ``probe``), which is how a CronJob's results reach Prometheus.

Failure: a ``ProbeResult`` that says what went wrong (the listener refused
or was unreachable, the message did not arrive within ``timeout``, the
mailbox could not be read); a Pushgateway that cannot be reached is said in
``pushed`` and does not change the verdict.
"""

from __future__ import annotations

import http.server
import imaplib
import secrets
import smtplib
import ssl
import threading
import time
from dataclasses import asdict, dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any

from mta.config import ProbeConfig, ProbeImapConfig, ProbeWebhookConfig
from mta.delivery.client import read_credentials
from mta.hostport import parse_host_port

HEADER = "X-Kubemta-Probe"
# What a probe run pushes to the Pushgateway (not on the server's /metrics).
SUCCESS, LATENCY, LAST_RUN = ("kubemta_probe_success", "kubemta_probe_latency_seconds",
                              "kubemta_probe_last_run_timestamp_seconds")
PUSHED = (SUCCESS, LATENCY, LAST_RUN)


@dataclass
class ProbeResult:
    success: bool
    token: str
    reason: str
    queue_id: str | None = None
    latency: float | None = None  # seconds from the 250 to the message in the mailbox
    pushed: str | None = None  # "ok", or why not; None without a Pushgateway

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _context(ca_file: Path | None) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)


def message(config: ProbeConfig, token: str) -> EmailMessage:
    out = EmailMessage()
    out["From"] = config.sender
    out["To"] = config.to
    out["Subject"] = f"kubemta probe {token}"
    out["Date"] = formatdate(localtime=False)
    # The token in the Message-ID too: a provider's delivery event names that, not our headers.
    out["Message-ID"] = make_msgid(idstring=f"kubemta-probe-{token}", domain=config.sender.rpartition("@")[2])
    out[HEADER] = token
    out.set_content(f"A synthetic probe message from mta probe ({config.name}); it is deleted on arrival.\n")
    return out


class _Mailbox:
    """One IMAP session with the probe's mailbox."""

    def __init__(self, config: ProbeImapConfig) -> None:
        host, port = parse_host_port(config.address, 993)
        context = _context(config.ca_file)
        if config.tls == "implicit":
            self.imap: imaplib.IMAP4 = imaplib.IMAP4_SSL(host, port, ssl_context=context, timeout=30)
        else:
            self.imap = imaplib.IMAP4(host, port, timeout=30)
            if config.tls == "starttls":
                self.imap.starttls(ssl_context=context)
        user, password = read_credentials(config.credentials_file)
        self.imap.login(user, password)
        self.imap.select(config.mailbox)

    def take(self, token: str) -> bool:
        """Whether the tagged message is there; deleted when it is."""
        self.imap.noop()  # new mail since the last look
        status, found = self.imap.search(None, "HEADER", HEADER, token)
        numbers = found[0].split() if status == "OK" and found and found[0] else []
        for number in numbers:
            self.imap.store(number, "+FLAGS", "\\Deleted")
        if numbers:
            self.imap.expunge()
        return bool(numbers)

    def close(self) -> None:
        try:
            self.imap.close()
            self.imap.logout()
        except (imaplib.IMAP4.error, OSError):
            pass  # the answer is known already


class _Events:
    """The probe's webhook while it waits: a POST to ``path`` whose body holds the token is the arrival."""

    def __init__(self, config: ProbeWebhookConfig, token: str) -> None:
        host, port = parse_host_port(config.listen)
        arrived = self.arrived = threading.Event()
        wanted = token.encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = min(int(self.headers.get("Content-Length") or 0), 1 << 20)
                body = self.rfile.read(length)
                if self.path.split("?", 1)[0] != config.path:
                    self.send_error(404)
                    return
                if wanted in body:
                    arrived.set()
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return None  # the probe prints its own result

        self.server = http.server.ThreadingHTTPServer((host, port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="probe-webhook", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def run(config: ProbeConfig, clock: Any = time.monotonic) -> ProbeResult:
    token = secrets.token_hex(8)
    events: _Events | None = None
    if config.webhook is not None:
        try:
            events = _Events(config.webhook, token)  # listening before the message can arrive
        except OSError as exc:
            return _report(config, ProbeResult(False, token, f"webhook.listen {config.webhook.listen}: {exc}"))
    try:
        queue_id = submit_message(config, token)
    except (smtplib.SMTPException, OSError, ValueError) as exc:
        if events is not None:
            events.close()
        return _report(config, ProbeResult(False, token, f"submission to {config.submit} failed: {exc}"))
    sent = clock()
    if events is not None:
        try:
            if events.arrived.wait(config.timeout):
                latency = clock() - sent
                return _report(config, ProbeResult(True, token, f"delivery event for {config.to} after "
                                                                f"{latency:.1f}s", queue_id, latency))
            return _report(config, ProbeResult(False, token, f"no delivery event for {config.to} after "
                                                             f"{config.timeout:.0f}s", queue_id))
        finally:
            events.close()
    assert config.imap is not None  # one of the two: the config says so
    deadline = sent + config.timeout
    try:
        mailbox = _Mailbox(config.imap)
    except (imaplib.IMAP4.error, OSError, ValueError) as exc:
        return _report(config, ProbeResult(False, token, f"mailbox {config.imap.address} unusable: {exc}",
                                           queue_id))
    try:
        while True:
            if mailbox.take(token):
                latency = clock() - sent
                return _report(config, ProbeResult(True, token, f"arrived in {config.to} after {latency:.1f}s",
                                                   queue_id, latency))
            if clock() >= deadline:
                return _report(config, ProbeResult(False, token, f"not in {config.to} after {config.timeout:.0f}s",
                                                   queue_id))
            time.sleep(min(config.poll, max(0.0, deadline - clock())))
    except (imaplib.IMAP4.error, OSError) as exc:
        return _report(config, ProbeResult(False, token, f"mailbox {config.imap.address} failed: {exc}", queue_id))
    finally:
        mailbox.close()


def submit_message(config: ProbeConfig, token: str) -> str:
    """Submit over SMTP; the queue id the listener named in its 250."""
    host, port = parse_host_port(config.submit, 587)
    context = _context(config.submit_ca_file)
    client = (smtplib.SMTP_SSL(host, port, timeout=30, context=context) if config.submit_tls == "implicit"
              else smtplib.SMTP(host, port, timeout=30))
    with client:
        client.ehlo()
        if config.submit_tls == "starttls":
            client.starttls(context=context)
            client.ehlo()
        if config.submit_credentials_file is not None:
            user, password = read_credentials(config.submit_credentials_file)
            client.login(user, password)
        data = message(config, token).as_bytes().replace(b"\n", b"\r\n")
        code, text = client.mail(config.sender)
        if code != 250:
            raise smtplib.SMTPSenderRefused(code, text, config.sender)
        code, text = client.rcpt(config.to)
        if code not in (250, 251):
            raise smtplib.SMTPRecipientsRefused({config.to: (code, text)})
        code, text = client.data(data)
        if code != 250:
            raise smtplib.SMTPDataError(code, text)
        return text.decode(errors="replace").rsplit(" ", 1)[-1]


def _report(config: ProbeConfig, result: ProbeResult) -> ProbeResult:
    if config.pushgateway is None:
        return result
    from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

    registry = CollectorRegistry()
    Gauge(SUCCESS, "The last probe's message arrived (1) or not (0)",
          registry=registry).set(1.0 if result.success else 0.0)
    if result.latency is not None:  # a failed probe has no latency: the last one stands
        Gauge(LATENCY, "The last successful probe's time from 250 to the mailbox",
              registry=registry).set(result.latency)
    Gauge(LAST_RUN, "When the last probe ended",
          registry=registry).set_to_current_time()
    try:
        push_to_gateway(config.pushgateway, job=config.job, grouping_key={"probe": config.name},
                        registry=registry, timeout=10)
        result.pushed = "ok"
    except OSError as exc:
        result.pushed = f"{config.pushgateway}: {exc}"
    return result
