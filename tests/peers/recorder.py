"""A receiving SMTP server (aiosmtpd) that records exactly what arrived.

Owns: one aiosmtpd ``Controller`` on 127.0.0.1 and a free port, in its own
thread.  For each transaction it keeps the MAIL and RCPT parameters and the
raw DATA octets as they came off the wire (after dot-unstuffing), so tests
can check bytes, not a re-rendered copy.  It also keeps each MAIL and RCPT
command in the order it came, with whether the client had already sent
more behind it (pipelined) when it was read.  aiosmtpd offers neither
PIPELINING nor ENHANCEDSTATUSCODES nor DSN, so the recorder is a receiver
without them (its own replies carry enhanced codes all the same; ``refuse``
replies are sent as given, with or without one).  The extensions it offers are
chosen per test, to stand for receivers that exist: ``hide`` removes any of
``8BITMIME``, ``SMTPUTF8``, ``SIZE``, ``PIPELINING``, ``STARTTLS`` from
its EHLO reply; ``size`` announces a SIZE limit; ``tls`` offers STARTTLS with
the given context (a certificate that may or may not verify); ``refuse``
maps recipient addresses to the reply RCPT gets for them (a provider's own
words, to stand for Gmail or Outlook refusing).  ``delays`` makes DATA slow
(seconds by recipient, ``"*"`` for any), for connections that stay open;
``concurrent``/``peak`` count the connections open now and at most, and each
message keeps when it arrived and the client's EHLO name, so a test can
measure the limits a deployment of senders holds together.  ``echo`` makes
the EHLO reply name the client's address as Exim's and Gmail's MXes do
(``250-host Hello name [192.0.2.1]``).

How it fails: ``start`` raises what aiosmtpd raises when the port is taken;
``wait_for`` raises TimeoutError naming what it has.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP

from tests.peers.net import free_port


@dataclass
class Received:
    session: int
    mail_from: str
    mail_options: list[str]
    rcpt_tos: list[str]
    rcpt_options: list[str]
    data: bytes
    tls: bool
    at: float = 0.0  # time.monotonic() when DATA ended
    helo: str = ""


@dataclass
class Command:
    session: int
    verb: str  # "MAIL" or "RCPT"
    address: str
    pipelined: bool  # the client had sent more before this command's reply


def _pipelined(server: Any) -> bool:
    # Whatever the client sent after this command's line is still in the reader's buffer:
    # a client that waits for each reply leaves it empty.
    return bool(getattr(server._reader, "_buffer", b""))


@dataclass
class _Handler:
    hide: set[str]
    refuse: dict[str, str] = field(default_factory=dict)
    delays: dict[str, float] = field(default_factory=dict)
    echo: bool = False
    concurrent: int = 0
    peak: int = 0
    messages: list[Received] = field(default_factory=list)
    sessions: list[int] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname  # a handler's EHLO hook does what aiosmtpd would
        self.sessions.append(id(session))
        if self.echo and responses:
            responses = [f"250-{server.hostname} Hello {hostname} [{session.peer[0]}]", *responses[1:]]
        return [line for line in responses if line[4:].split(" ", 1)[0].upper() not in self.hide]

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          mail_options: list[str]) -> str:
        self.commands.append(Command(id(session), "MAIL", address, _pipelined(server)))
        envelope.mail_from = address  # a handler's MAIL hook does what aiosmtpd would
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        self.commands.append(Command(id(session), "RCPT", address, _pipelined(server)))
        refusal = self.refuse.get(address.lower())
        if refusal is not None:
            return refusal
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    def connected(self) -> None:
        self.concurrent += 1
        self.peak = max(self.peak, self.concurrent)

    def disconnected(self) -> None:
        self.concurrent -= 1

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        delay = max((self.delays.get(r.lower(), self.delays.get("*", 0.0)) for r in envelope.rcpt_tos),
                    default=0.0)
        if delay:
            await asyncio.sleep(delay)
        self.messages.append(Received(
            session=id(session), mail_from=envelope.mail_from, mail_options=list(envelope.mail_options),
            rcpt_tos=list(envelope.rcpt_tos), rcpt_options=list(envelope.rcpt_options),
            data=bytes(envelope.original_content or b""),
            tls=server.transport.get_extra_info("sslcontext") is not None,
            at=time.monotonic(), helo=str(session.host_name or "")))
        return "250 2.0.0 Ok: recorded"


class _CountingSMTP(SMTP):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.event_handler.connected()

    def connection_lost(self, error: Exception | None) -> None:
        self.event_handler.disconnected()
        super().connection_lost(error)


class _Controller(Controller):
    def factory(self) -> SMTP:
        return _CountingSMTP(self.handler, **self.SMTP_kwargs)


class Recorder:
    def __init__(self, *, hide: Iterable[str] = (), size: int | None = None,
                 tls: ssl.SSLContext | None = None, port: int | None = None,
                 refuse: dict[str, str] | None = None, host: str = "127.0.0.1",
                 delays: dict[str, float] | None = None, echo: bool = False) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.handler = _Handler({name.upper() for name in hide}, {k.lower(): v for k, v in (refuse or {}).items()},
                                {k.lower(): v for k, v in (delays or {}).items()}, echo)
        kwargs: dict[str, Any] = {"enable_SMTPUTF8": True, "decode_data": False}
        if size is not None:
            kwargs["data_size_limit"] = size
        if tls is not None:
            kwargs["tls_context"] = tls
        self.controller = _Controller(self.handler, hostname=self.host, port=self.port, **kwargs)

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages

    @property
    def commands(self) -> list[Command]:
        return self.handler.commands

    @property
    def sessions(self) -> list[int]:
        return self.handler.sessions

    def start(self) -> Recorder:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()

    def wait_for(self, n: int, timeout: float = 20.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"recorder on port {self.port} has {len(self.messages)} of {n} messages")
            time.sleep(0.02)
        return self.messages

    def __enter__(self) -> Recorder:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
