"""SMTP listeners: aiosmtpd sessions served from our own event loop.

``KubemtaSMTP`` adjusts aiosmtpd where the product needs it: every
2xx/4xx/5xx reply carries an enhanced status code; an address aiosmtpd
cannot parse is a ``501`` through the one error mapper; sessions are
counted (in all and per client address) and refused with ``421`` past the
limits; too many failed commands end the session; the DATA phase has a
deadline of its own and reads the content in blocks (``mta.smtp.data``);
plain ``<local@domain>`` paths skip aiosmtpd's general address parser.
``Listener`` binds a socket with ``loop.create_server`` (with TLS from the
first byte for ``submissions``, shared with other processes for
``mta.workers``) and can stop accepting while sessions already running
finish.

Failure: binding errors raise ``OSError`` at start (the caller names the
listener); a session's errors become replies, never crash the server.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
from collections.abc import Iterator
from typing import Any, AnyStr

from aiosmtpd.smtp import MISSING, SMTP, syntax

from mta import replies
from mta.config import Config, ListenerConfig
from mta.obs.log import event
from mta.policy.relay import client_ip
from mta.smtp.data import TOO_LONG, read_content
from mta.smtp.dispatch import DispatchNames
from mta.smtp.enhanced import add_enhanced_code
from mta.smtp.session import SessionHandler
from mta.smtp.tls import ServerTls

log = logging.getLogger(__name__)

JUNK_COMMANDS = ("NOOP", "RSET", "VRFY", "EXPN", "HELP")
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
# <dot-atom@domain> in plain ASCII, nothing else (RFC 5321 §4.1.2).
_SIMPLE_PATH = re.compile(rf"<(?P<local>{_ATOM}(?:\.{_ATOM})*)@(?P<domain>[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>")


class Connections:
    """Open sessions of a listener, by client address."""

    def __init__(self) -> None:
        self.sessions: set[KubemtaSMTP] = set()
        self.per_ip: collections.Counter[str] = collections.Counter()


class KubemtaSMTP(DispatchNames, SMTP):
    """aiosmtpd's protocol with our reply conventions and limits."""

    def __init__(self, *args: Any, connections: Connections, config: Config, listener: ListenerConfig,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._connections = connections
        self._mta = config
        self._listener = listener
        self._greeted = False  # the 220 greeting carries no enhanced code
        self._raw = False  # nor do replies to EHLO and HELO (RFC 2034)
        self._errors = 0
        self._ip = ""
        self._counted = False

    # -- connection limits ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if not first:
            return  # the same session, now over TLS
        connections = self._connections
        ip = client_ip(transport.get_extra_info("peername"))
        self._ip = str(ip) if ip is not None else "?"
        limits = self._mta.limits
        refusal = None
        if len(connections.sessions) >= limits.max_connections:
            refusal = replies.TOO_MANY_CONNECTIONS
        elif connections.per_ip[self._ip] >= limits.max_connections_per_ip and not self._listener.proxy_protocol:
            # Behind a PROXY-speaking balancer every peer is the balancer.
            refusal = replies.TOO_MANY_FROM_YOU
        if refusal is not None:
            event("rejected", level=logging.WARNING, listener=self._listener.name, client=self._ip,
                  reply=str(refusal), reason="connection limit")
            if self._handler_coroutine is not None:
                self._handler_coroutine.cancel()
            transport.write(f"{refusal}\r\n".encode())
            transport.close()
            return
        connections.sessions.add(self)
        connections.per_ip[self._ip] += 1
        self._counted = True

    def connection_lost(self, error: Exception | None) -> None:
        if self._counted:
            self._counted = False
            self._connections.sessions.discard(self)
            self._connections.per_ip[self._ip] -= 1
            if self._connections.per_ip[self._ip] <= 0:
                del self._connections.per_ip[self._ip]
        super().connection_lost(error)

    # -- replies ------------------------------------------------------------

    async def push(self, status: AnyStr) -> None:
        if isinstance(status, str) and self._greeted and not self._raw:
            status = add_enhanced_code(status)  # type: ignore[assignment]
            if status[:1] == "5":  # type: ignore[index]
                self._errors += 1
        self._greeted = True
        await super().push(status)
        if self._errors == self._mta.limits.max_errors and self.transport is not None:
            self._errors += 1  # say it once
            event("rejected", level=logging.WARNING, listener=self._listener.name, client=self._ip,
                  reply=str(replies.TOO_MANY_ERRORS), reason="error budget")
            await super().push(str(replies.TOO_MANY_ERRORS))
            self.transport.close()

    @contextlib.contextmanager
    def _without_enhanced_codes(self) -> Iterator[None]:
        self._raw = True
        try:
            yield
        finally:
            self._raw = False

    async def smtp_EHLO(self, hostname: str) -> None:
        with self._without_enhanced_codes():
            await super().smtp_EHLO(hostname)

    async def smtp_HELO(self, hostname: str) -> None:
        with self._without_enhanced_codes():
            await super().smtp_HELO(hostname)

    async def smtp_STARTTLS(self, arg: str) -> None:
        if self._tls_protocol is not None or (self.transport is not None
                                              and self.transport.get_extra_info("sslcontext")):
            await self.push(str(replies.TLS_ACTIVE))
            return
        await super().smtp_STARTTLS(arg)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        # The whole DATA phase gets one deadline: a floor on the transfer
        # rate, so a client trickling bytes cannot hold a session forever.
        self._reset_timeout(self._mta.limits.data_timeout)
        try:
            await self._data(arg)
        finally:
            self._reset_timeout()

    async def _data(self, arg: str) -> None:
        """aiosmtpd's DATA command with the content read in blocks (``mta.smtp.data``)."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            content = await read_content(self._reader, self.data_size_limit, self.line_length_limit)
        except asyncio.IncompleteReadError:
            # The client went away in the middle: nothing of it is kept, and
            # aiosmtpd ends the session quietly on a reset.
            raise ConnectionResetError("connection closed during DATA") from None
        if content.problem is not None:
            self._set_post_data_state()
            await self.push("500 Line too long (see RFC5321 4.5.3.1.6)" if content.problem == TOO_LONG
                            else "552 Error: Too much mail data")
            return
        self.envelope.content = self.envelope.original_content = content.data
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        simple = _SIMPLE_PATH.match(arg)
        if simple is not None and not (self.local_part_limit and len(simple["local"]) > self.local_part_limit):
            rest = arg[simple.end():].lstrip(" \t")
            if not rest.startswith("("):
                # What almost every client sends; aiosmtpd's general parser
                # (which defines a class on each call) answers the same, slower.
                return f"{simple['local']}@{simple['domain']}", rest
        address, rest = super()._getaddr(arg)
        if address is None:
            raise replies.Rejected(replies.BAD_ADDRESS_SYNTAX, f"unparseable address {arg!r}")
        return address, rest

    @property
    def in_transaction(self) -> bool:
        return bool(self.envelope and (self.envelope.mail_from or self.envelope.rcpt_tos))


class Listener:
    def __init__(self, listener: ListenerConfig, config: Config, handler: SessionHandler) -> None:
        self.config = listener
        self.mta_config = config
        self.handler = handler
        self.connections = Connections()
        self.server: asyncio.Server | None = None
        self.tls = ServerTls(listener.tls.cert_file, listener.tls.key_file) if listener.tls else None

    @property
    def sessions(self) -> set[KubemtaSMTP]:
        return self.connections.sessions

    def _protocol(self) -> KubemtaSMTP:
        listener, config = self.config, self.mta_config
        implicit = listener.mode == "submissions"
        allow_plaintext = bool(listener.auth and listener.auth.allow_plaintext)
        limits = config.limits
        junk: dict[str, int] = dict.fromkeys(JUNK_COMMANDS, limits.max_junk_commands)
        junk["*"] = 10**9  # MAIL/RCPT/DATA are bounded by sizes and rates instead
        # Called per connection before its handshake: a renewed certificate
        # is loaded into the shared context here, also for implicit TLS.
        context = self.tls.current() if self.tls else None
        protocol = KubemtaSMTP(
            self.handler,
            connections=self.connections,
            config=config,
            listener=listener,
            hostname=config.hostname,
            ident="ESMTP kubemta",
            data_size_limit=limits.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            # STARTTLS only where TLS is not already there from the start.
            tls_context=context if not implicit else None,
            # On an implicit-TLS listener aiosmtpd does not see TLS; it is always there.
            auth_require_tls=not (allow_plaintext or implicit),
            auth_required=False,
            command_call_limit=junk,
            timeout=limits.session_timeout,
            proxy_protocol_timeout=10.0 if listener.proxy_protocol else None,
            loop=asyncio.get_running_loop(),
        )
        protocol.line_length_limit = limits.max_line_length + 1  # + the transparency dot
        protocol.command_size_limit = limits.max_command_length
        return protocol

    async def start(self, *, reuse_port: bool = False) -> None:
        """Listen; with ``reuse_port`` other processes of this server share the port (``mta.workers``)."""
        host, port = self.config.host_port
        loop = asyncio.get_running_loop()
        ssl_context = self.tls.current() if self.tls and self.config.mode == "submissions" else None
        self.server = await loop.create_server(self._protocol, host=host, port=port, reuse_address=True,
                                               reuse_port=reuse_port or None, ssl=ssl_context)
        if self.config.auth and self.config.auth.allow_plaintext:
            log.warning("listener %s allows AUTH without TLS: passwords cross the network in clear text",
                        self.config.name)
        log.info("listener %s (%s) on %s", self.config.name, self.config.mode, self.config.address)

    @property
    def serving(self) -> bool:
        return self.server is not None and self.server.is_serving()

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()

    async def drain(self, deadline: float) -> None:
        """Wait for sessions to end until ``deadline``, then close the rest."""
        loop = asyncio.get_running_loop()
        while self.sessions and loop.time() < deadline:
            # Idle sessions can go now; ones inside a transaction may finish.
            for session in list(self.sessions):
                if not session.in_transaction and session.transport is not None:
                    session.transport.close()
            await asyncio.sleep(0.05)
        for session in list(self.sessions):
            if session.transport is not None:
                session.transport.close()
