"""SMTP listeners: aiosmtpd sessions served from our own event loop.

``KubemtaSMTP`` adjusts aiosmtpd where the product needs it: every
2xx/4xx/5xx reply carries an enhanced status code, and an address aiosmtpd
cannot parse is a ``501`` through the one error mapper.  ``Listener`` binds
a socket with ``loop.create_server`` and can stop accepting while sessions
already running finish.

Failure: binding errors raise ``OSError`` at start (the caller names the
listener); a session's errors become replies, never crash the server.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AnyStr

from aiosmtpd.smtp import SMTP

from mta.config import Config, ListenerConfig
from mta.smtp import replies
from mta.smtp.session import SessionHandler

log = logging.getLogger(__name__)


class KubemtaSMTP(SMTP):
    """aiosmtpd's protocol with our reply conventions."""

    def __init__(self, *args: Any, sessions: set[KubemtaSMTP], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sessions = sessions
        self._greeted = False  # the 220 greeting carries no enhanced code
        self._raw = False  # nor do replies to EHLO and HELO (RFC 2034)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._sessions.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self._sessions.discard(self)
        super().connection_lost(error)

    async def push(self, status: AnyStr) -> None:
        if isinstance(status, str) and self._greeted and not self._raw:
            status = replies.add_enhanced_code(status)  # type: ignore[assignment]
        self._greeted = True
        await super().push(status)

    async def smtp_EHLO(self, hostname: str) -> None:
        self._raw = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._raw = False

    async def smtp_HELO(self, hostname: str) -> None:
        self._raw = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._raw = False

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
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
        self.sessions: set[KubemtaSMTP] = set()
        self.server: asyncio.Server | None = None

    def _protocol(self) -> KubemtaSMTP:
        return KubemtaSMTP(
            self.handler,
            sessions=self.sessions,
            hostname=self.mta_config.hostname,
            ident="ESMTP kubemta",
            data_size_limit=self.mta_config.limits.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            timeout=self.mta_config.limits.session_timeout,
            loop=asyncio.get_running_loop(),
        )

    async def start(self) -> None:
        host, port = self.config.host_port
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._protocol, host=host, port=port, reuse_address=True)
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
