"""``mta send``: a test message through this server's own relay listener, followed to its outcome.

Builds a small message (``From``, ``To``, ``Subject``, ``Date``,
``Message-ID``), submits it over SMTP to the first relay listener that has
no PROXY protocol (a wildcard address is reached on loopback), and returns
the queue id from the ``250 ... queued as ID`` reply.  ``follow`` then reads
the queue (``mta queue show`` through the control socket) until the message
has left it, reporting each recipient's state and last reply as they change.

Failure: ``SendError`` with a readable reason — no usable listener, the
listener refused a command (its reply), the server unreachable, or (for
``follow``) the message still queued when the time is up.
"""

from __future__ import annotations

import email.utils
import smtplib
import time
from collections.abc import Callable
from email.message import EmailMessage
from typing import Any

from mta.config import Config
from mta.hostport import parse_host_port


class SendError(Exception):
    pass


def relay_address(config: Config) -> tuple[str, int]:
    """Where this host reaches its own relay listener."""
    for listener in config.listeners:
        if listener.mode == "relay" and not listener.proxy_protocol:
            host, port = parse_host_port(listener.address)
            wildcard = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}
            return wildcard.get(host, host), port
    raise SendError("no relay listener to submit through (mta send needs a listener with mode: relay)")


def build(config: Config, sender: str, recipients: list[str], subject: str, body: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    message["Subject"] = subject
    message["Date"] = email.utils.formatdate(localtime=False)
    message["Message-ID"] = email.utils.make_msgid(domain=config.hostname)
    message.set_content(body)
    return message


def submit(config: Config, sender: str, recipients: list[str], message: EmailMessage, timeout: float = 30) -> str:
    """Submit over SMTP; returns the queue id."""
    host, port = relay_address(config)
    try:
        with smtplib.SMTP(host, port, timeout=timeout, local_hostname=config.hostname) as client:
            client.ehlo()
            code, text = client.mail(sender)
            if code != 250:
                raise SendError(f"MAIL FROM refused: {code} {text.decode(errors='replace')}")
            for rcpt in recipients:
                code, text = client.rcpt(rcpt)
                if code not in (250, 251):
                    raise SendError(f"RCPT TO:<{rcpt}> refused: {code} {text.decode(errors='replace')}")
            code, text = client.data(message.as_bytes().replace(b"\n", b"\r\n"))
    except (OSError, smtplib.SMTPException) as exc:
        raise SendError(f"cannot submit to {host}:{port}: {exc}") from None
    reply = text.decode(errors="replace")
    if code != 250 or "queued as " not in reply:
        raise SendError(f"DATA refused: {code} {reply}")
    return reply.rsplit("queued as ", 1)[1].split()[0]


def follow(queue_id: str, show: Callable[[str], dict[str, Any] | None], report: Callable[[str], None],
           timeout: float, interval: float = 0.5) -> None:
    """Until the message leaves the queue; reports each change of a recipient's state or reply."""
    deadline = time.monotonic() + timeout
    seen: dict[str, tuple[str, str | None]] = {}
    while time.monotonic() < deadline:
        info = show(queue_id)
        if info is None:
            report("left the queue: every recipient has its outcome (a bounce goes to the sender as a DSN)")
            return
        for rcpt in info["recipients"]:
            now = (rcpt["state"], rcpt["last_reply"])
            if seen.get(rcpt["address"]) != now:
                seen[rcpt["address"]] = now
                reply = f" ({rcpt['last_reply']})" if rcpt["last_reply"] else ""
                report(f"<{rcpt['address']}> {rcpt['state']}{reply}; attempts={info['attempts']} "
                       f"next={info['next_attempt']}")
        time.sleep(interval)
    raise SendError(f"{queue_id} is still queued after {timeout:g}s (mta queue show {queue_id})")
