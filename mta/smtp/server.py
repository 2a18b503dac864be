"""SMTP listeners: aiosmtpd sessions served from our own event loop.

``KubemtaSMTP`` adjusts aiosmtpd where the product needs it: every
2xx/4xx/5xx reply carries an enhanced status code; an address aiosmtpd
cannot parse is a ``501`` through the one error mapper; too many failed
commands end the session, and so do too many junk commands (NOOP, RSET,
VRFY, EXPN, HELP, and EHLO/HELO after the first few; the count starts
again after each message accepted); the DATA phase has a deadline of its
own and reads the content in blocks (``mta.smtp.data``); DSN parameters
are read before aiosmtpd sees MAIL and RCPT (``mta.smtp.dsnparams``); plain
``<local@domain>`` paths skip aiosmtpd's general address parser.  Besides
aiosmtpd's timeout per command, a session ends with ``421 4.4.2`` when it
has gone ``session_idle_timeout`` without MAIL, RCPT, DATA, AUTH or
STARTTLS, and when it is older than ``session_lifetime``.  Behind a PROXY
balancer the session has its connection counted for the address the header
names, once it has read it.

``Listener`` binds a socket with ``loop.create_server`` (shared with other
processes for ``mta.workers``); every connection goes through its front
door (``mta.smtp.door``: counted from accept, limits, implicit TLS) before
it becomes a session.  At shutdown it stops accepting, tells idle sessions
``421 4.3.2`` and lets those inside a transaction finish until the deadline.

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
from mta.policy.relay import client_ip, is_trusted
from mta.replies import Reply
from mta.smtp.data import DataCommand
from mta.smtp.dispatch import DispatchNames
from mta.smtp.door import Front, Slot
from mta.smtp.dsnparams import DsnParameters
from mta.smtp.enhanced import add_enhanced_code
from mta.smtp.session import SessionHandler, client_address
from mta.smtp.tls import ServerTls

log = logging.getLogger(__name__)

# EHLO at the start, again after STARTTLS, and one to spare; later ones are junk.
FREE_GREETINGS = 3
# The commands that move a session on; anything else keeps it idle.
PROGRESS = frozenset({"MAIL", "RCPT", "DATA", "AUTH"})
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
# <dot-atom@domain> in plain ASCII, nothing else (RFC 5321 §4.1.2).
# aiosmtpd's parser drops a CR inside a domain ("a@b.c\rX" becomes "a@b.cX"): refuse it first.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SIMPLE_PATH = re.compile(rf"<(?P<local>{_ATOM}(?:\.{_ATOM})*)@(?P<domain>[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>")


AUTH_LINE_LIMIT = 12288 + 2  # RFC 4954's 12288 octets, and CRLF


class KubemtaSMTP(DataCommand, DispatchNames, DsnParameters, SMTP):
    """aiosmtpd's protocol with our reply conventions and limits."""

    def __init__(self, *args: Any, sessions: set[KubemtaSMTP], config: Config, listener: ListenerConfig,
                 slot: Slot | None = None, **kwargs: Any) -> None:
        # The stream reader's own limit is set from this at construction: an AUTH line (command
        # or response) may have 12288 octets (RFC 4954, section 4) — a ServiceAccount token in
        # base64 is well over aiosmtpd's 1001.  Commands keep their sizes below; DATA its own.
        self.line_length_limit = AUTH_LINE_LIMIT
        super().__init__(*args, **kwargs)
        # Per session (aiosmtpd's is one dict shared by every session of the process).
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit,
                                                           {"AUTH": AUTH_LINE_LIMIT})
        self._sessions = sessions
        self._mta = config
        self._listener = listener
        self._slot = slot  # None only for a protocol built without a front door (unit tests)
        self._greeted = False  # the 220 greeting carries no enhanced code
        self._raw = False  # nor do replies to EHLO and HELO (RFC 2034)
        self._errors = 0
        self._junk = 0
        self._greetings = 0
        self._ip = slot.ip if slot is not None else ""
        self._progress = 0.0  # loop time of the last command that moved the session on
        self._in_data = False
        self._closing: Reply | None = None  # the 421 this session ends with, once it may
        self._closing_reason = ""
        self._finish_transaction = False  # may a transaction under way finish first?
        self._ended = False
        self._timers: list[asyncio.TimerHandle] = []

    # -- the connection ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if not first:
            return  # the same session, now over TLS
        if self._slot is not None:
            self._slot.in_session = True
        if not self._ip:
            ip = client_ip(transport.get_extra_info("peername"))
            self._ip = str(ip) if ip is not None else "?"
        self._sessions.add(self)
        limits = self._mta.limits
        self._progress = self.loop.time()
        self._timers = [self.loop.call_later(limits.session_idle_timeout, self._check_idle),
                        self.loop.call_later(limits.session_lifetime, self._expire)]

    def connection_lost(self, error: Exception | None) -> None:
        if self._slot is not None:
            self._slot.release()
        if self.session is not None:
            self.event_handler.transaction_over(self.session)  # account rates held by an unfinished transaction
        self._sessions.discard(self)
        for timer in self._timers:
            timer.cancel()
        super().connection_lost(error)

    def _set_post_data_state(self) -> None:
        # Every end of a transaction passes here (after DATA, RSET, HELO/EHLO).
        if self.session is not None:
            self.event_handler.transaction_over(self.session)
        super()._set_post_data_state()

    def _check_idle(self) -> None:
        limit = self._mta.limits.session_idle_timeout
        now = self.loop.time()
        if self._in_data:
            # DATA has a deadline of its own (data_timeout).
            self._timers[0] = self.loop.call_later(limit, self._check_idle)
        elif now < self._progress + limit:
            self._timers[0] = self.loop.call_at(self._progress + limit, self._check_idle)
        else:
            self.close_when_idle(replies.IDLE_TIMEOUT, "idle timeout", finish_transaction=False)

    def _expire(self) -> None:
        self.close_when_idle(replies.SESSION_TOO_LONG, "session lifetime", finish_transaction=False)

    # -- ending a session with a reply ---------------------------------------

    def close_when_idle(self, reply: Reply, reason: str, *, finish_transaction: bool = True) -> None:
        """End the session with ``reply``: now if it waits for a command, else after the reply under way.

        With ``finish_transaction`` a mail transaction already begun may
        go on to its end (no new one begins); without it only a DATA
        transfer under way finishes.
        """
        if self._ended or self.transport is None:
            return
        if self._closing is None:
            self._closing, self._closing_reason, self._finish_transaction = reply, reason, finish_transaction
        else:
            self._finish_transaction = self._finish_transaction and finish_transaction
        # StreamReader has a waiter exactly while aiosmtpd waits for input.
        if self._reader._waiter is not None and self._may_close():  # type: ignore[attr-defined]
            self._close()

    def close_now(self, reply: Reply, reason: str) -> None:
        if self._closing is None:
            self._closing, self._closing_reason = reply, reason
        self._close()

    def _may_close(self) -> bool:
        return not self._in_data and not (self._finish_transaction and self.in_transaction)

    def _close(self) -> None:
        if self._ended or self.transport is None or self._closing is None:
            return
        self._ended = True
        shutdown = self._closing is replies.SHUTTING_DOWN
        event("rejected", level=logging.INFO if shutdown else logging.WARNING, listener=self._listener.name,
              client=self._ip, reply=str(self._closing), reason=self._closing_reason)
        self.transport.write(f"{self._closing}\r\n".encode())
        self.transport.close()

    # -- replies ------------------------------------------------------------

    async def push(self, status: AnyStr) -> None:
        if self._ended:
            return  # the session's last word was its 421
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
        elif self._closing is not None and status[3:4] not in ("-", b"-") and self._may_close():
            self._close()

    async def _call_handler_hook(self, command: str, *args: Any) -> Any:
        if command == "MAIL" and self._closing is not None:
            self._close()  # no new transaction in a session that is ending
            return str(self._closing)
        status = await super()._call_handler_hook(command, *args)
        if command in PROGRESS:
            self._progress = self.loop.time()
        if command == "PROXY" and status and status is not MISSING and not self._identify_proxied():
            return False  # aiosmtpd closes the connection
        if command == "DATA" and isinstance(status, str) and status.startswith("250"):
            self._junk = 0  # a client that sends mail may keep its session alive
        return status

    def _identify_proxied(self) -> bool:
        """Count the connection for the client the PROXY header names, or refuse it."""
        if self._slot is None:
            return True
        assert self.session is not None
        ip = client_address(self.session)
        refusal = self._slot.identify(ip, is_trusted(ip, self._listener.trusted_networks))
        self._ip = ip
        if refusal is None:
            return True
        reply, reason = refusal
        event("rejected", level=logging.WARNING, listener=self._listener.name, client=ip, reply=str(reply),
              reason=reason)
        assert self.transport is not None
        self.transport.write(f"{reply}\r\n".encode())
        self._ended = True
        return False

    def _junk_allowed(self) -> bool:
        self._junk += 1
        if self._junk <= self._mta.limits.max_junk_commands:
            return True
        self.close_now(replies.TOO_MANY_JUNK, "junk commands")
        return False

    @contextlib.contextmanager
    def _without_enhanced_codes(self) -> Iterator[None]:
        self._raw = True
        try:
            yield
        finally:
            self._raw = False

    def _greeting_allowed(self) -> bool:
        self._greetings += 1
        return self._greetings <= FREE_GREETINGS or self._junk_allowed()

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        if self._greeting_allowed():
            with self._without_enhanced_codes():
                await super().smtp_EHLO(hostname)

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        if self._greeting_allowed():
            with self._without_enhanced_codes():
                await super().smtp_HELO(hostname)

    @syntax("NOOP [ignored]")
    async def smtp_NOOP(self, arg: str) -> None:
        if self._junk_allowed():
            await super().smtp_NOOP(arg)

    @syntax("RSET")
    async def smtp_RSET(self, arg: str) -> None:
        if self._junk_allowed():
            await super().smtp_RSET(arg)

    @syntax("VRFY <address>")
    async def smtp_VRFY(self, arg: str) -> None:
        if self._junk_allowed():
            await super().smtp_VRFY(arg)

    async def smtp_EXPN(self, arg: str) -> None:
        if self._junk_allowed():
            await super().smtp_EXPN(arg)

    @syntax("HELP [command]")
    async def smtp_HELP(self, arg: str) -> None:
        if self._junk_allowed():
            await super().smtp_HELP(arg)

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        if self._tls_protocol is not None or (self.transport is not None
                                              and self.transport.get_extra_info("sslcontext")):
            await self.push(str(replies.TLS_ACTIVE))
            return
        self._progress = self.loop.time()
        # aiosmtpd's timeout closes the connection if the handshake is not
        # done by then; connection_made over TLS sets the usual one again.
        self._reset_timeout(self._mta.limits.tls_handshake_timeout)
        await super().smtp_STARTTLS(arg)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        # The whole DATA phase gets one deadline: a floor on the transfer
        # rate, so a client trickling bytes cannot hold a session forever.
        self._reset_timeout(self._mta.limits.data_timeout)
        self._in_data = True
        self._progress = self.loop.time()
        try:
            await self._data(arg)  # mta.smtp.data
        finally:
            self._in_data = False
            self._progress = self.loop.time()
            self._reset_timeout()
        if self._closing is not None and self._may_close():
            self._close()

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        simple = _SIMPLE_PATH.match(arg)
        if simple is not None and not (self.local_part_limit and len(simple["local"]) > self.local_part_limit):
            rest = arg[simple.end():].lstrip(" \t")
            if not rest.startswith("("):
                # What almost every client sends; aiosmtpd's general parser
                # (which defines a class on each call) answers the same, slower.
                return f"{simple['local']}@{simple['domain']}", self.take_dsn_parameters(rest)
        address, rest = super()._getaddr(arg) if not _CONTROL.search(arg) else (None, None)
        if address is None:
            raise replies.Rejected(replies.BAD_ADDRESS_SYNTAX, f"unparseable address {arg!r}")
        return address, self.take_dsn_parameters(rest)

    @property
    def in_transaction(self) -> bool:
        return bool(self.envelope and (self.envelope.mail_from or self.envelope.rcpt_tos))


class Listener:
    def __init__(self, listener: ListenerConfig, config: Config, handler: SessionHandler) -> None:
        self.config = listener
        self.mta_config = config
        self.handler = handler
        self.sessions: set[KubemtaSMTP] = set()
        self.server: asyncio.Server | None = None
        self.tls = ServerTls(listener.tls.cert_file, listener.tls.key_file) if listener.tls else None
        implicit = self.tls if listener.mode == "submissions" else None
        # Asked per connection: a renewed certificate is loaded into the shared context then.
        self.front = Front(listener, config.limits, self._protocol, implicit.current if implicit else None)

    def _protocol(self, slot: Slot | None = None) -> KubemtaSMTP:
        listener, config = self.config, self.mta_config
        implicit = listener.mode == "submissions"
        allow_plaintext = bool(listener.auth and listener.auth.allow_plaintext)
        limits = config.limits
        # Called per connection before STARTTLS can be asked for: a renewed
        # certificate is loaded into the shared context here.
        context = self.tls.current() if self.tls and not implicit else None
        protocol = KubemtaSMTP(
            self.handler,
            sessions=self.sessions,
            config=config,
            listener=listener,
            slot=slot,
            hostname=config.hostname,
            ident="ESMTP kubemta",
            data_size_limit=limits.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            # STARTTLS only where TLS is not already there from the start.
            tls_context=context,
            # On an implicit-TLS listener aiosmtpd does not see TLS; it is always there.
            auth_require_tls=not (allow_plaintext or implicit),
            auth_required=False,
            # Junk commands are counted by KubemtaSMTP, all kinds together;
            # MAIL/RCPT/DATA are bounded by sizes and rates instead.
            command_call_limit=None,
            timeout=limits.session_timeout,
            proxy_protocol_timeout=10.0 if listener.proxy_protocol else None,
            loop=asyncio.get_running_loop(),
        )
        protocol.line_length_limit = limits.line_limit + 1  # + the transparency dot
        protocol.data_in_flight_limit = limits.data_in_flight
        protocol.command_size_limit = limits.max_command_length
        return protocol

    async def start(self, *, reuse_port: bool = False) -> None:
        """Listen; with ``reuse_port`` other processes of this server share the port (``mta.workers``)."""
        host, port = self.config.host_port
        loop = asyncio.get_running_loop()
        # No ssl= even for implicit TLS: the front door runs the handshake, so
        # that the connection is counted (and bounded) from its accept on.
        self.server = await loop.create_server(self.front.protocol, host=host, port=port, reuse_address=True,
                                               reuse_port=reuse_port or None)
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
        self.front.close()

    async def drain(self, deadline: float) -> None:
        """Idle sessions get ``421 4.3.2`` now; those in a transaction may finish it until ``deadline``."""
        loop = asyncio.get_running_loop()
        while self.sessions and loop.time() < deadline:
            # Again each round: a session that finished its transaction goes
            # with the reply to its DATA, one that began late is told too.
            for session in list(self.sessions):
                session.close_when_idle(replies.SHUTTING_DOWN, "shutting down")
            await asyncio.sleep(0.05)
        for session in list(self.sessions):
            session.close_now(replies.SHUTTING_DOWN, "shutdown timeout")
