"""Server TLS contexts built from certificate files, reloaded when they change.

A cert-manager Secret mount changes its files in place on renewal.  Each
new connection asks for the context; when the files' modification times
have moved, the certificate is loaded into the same ``SSLContext`` again,
so new handshakes use it without a restart (sessions already running keep
theirs).  TLS 1.2 is the minimum.

Failure: ``TlsError`` at start when the files do not load; a reload that
fails keeps the previous certificate and logs why.
"""

from __future__ import annotations

import logging
import ssl
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
