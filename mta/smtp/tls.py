"""Server TLS contexts built from certificate files, reloaded when they change.

A cert-manager Secret mount changes its files in place on renewal.  Each
new connection asks for the context; when the files' modification times
have moved, the certificate is loaded into the same ``SSLContext`` again,
so new handshakes use it without a restart (sessions already running keep
theirs).  TLS 1.2 is the minimum.

``start_server_tls`` runs the server side of a handshake on a connection
already accepted, with a deadline, so that the listener can count and bound
handshakes from the moment of accept (``mta.smtp.door``).

Failure: ``TlsError`` at start when the files do not load; a reload that
fails keeps the previous certificate and logs why.  A handshake that fails
or runs out of time fails the future ``start_server_tls`` returns and the
connection is closed.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from asyncio import sslproto
from pathlib import Path

log = logging.getLogger(__name__)


class TlsError(Exception):
    pass


class ServerTls:
    def __init__(self, cert_file: Path, key_file: Path) -> None:
        self.cert_file, self.key_file = Path(cert_file), Path(key_file)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.options |= ssl.OP_NO_COMPRESSION
        self._stamp: tuple[float, float] | None = None
        try:
            self._load()
        except (OSError, ssl.SSLError) as exc:
            raise TlsError(f"cannot load certificate {self.cert_file} / key {self.key_file}: {exc}") from None

    def _mtimes(self) -> tuple[float, float]:
        return self.cert_file.stat().st_mtime, self.key_file.stat().st_mtime

    def _load(self) -> None:
        stamp = self._mtimes()
        self.context.load_cert_chain(self.cert_file, self.key_file)
        self._stamp = stamp

    def current(self) -> ssl.SSLContext:
        """The context, with the certificate reloaded first if its files changed."""
        try:
            if self._mtimes() != self._stamp:
                self._load()
                log.info("TLS certificate %s reloaded", self.cert_file)
        except (OSError, ssl.SSLError) as exc:
            log.error("TLS certificate %s not reloaded, keeping the previous one: %s", self.cert_file, exc)
        return self.context


def start_server_tls(transport: asyncio.Transport, protocol: asyncio.Protocol, context: ssl.SSLContext,
                     timeout: float) -> asyncio.Future[None]:
    """Put TLS under ``protocol`` on an accepted plain connection; it gets ``connection_made`` once TLS is up.

    This is what ``loop.create_server(ssl=...)`` does inside, done here
    because there the listener sees a connection only after its handshake.
    ``asyncio.sslproto`` is the layer both asyncio and aiosmtpd (for
    STARTTLS) use.  The future is done when the handshake is: with an error
    when it failed or took longer than ``timeout`` (the connection is then
    aborted), and with ``None`` also when the connection was closed before
    the end of the handshake, so the caller checks whether ``protocol`` started.
    """
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    layer = sslproto.SSLProtocol(loop, protocol, context, waiter, server_side=True, call_connection_made=True,
                                 ssl_handshake_timeout=timeout)
    transport.set_protocol(layer)
    layer.connection_made(transport)
    return waiter
