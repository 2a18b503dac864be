"""TLS contexts for the handoff, from ``drain.tls`` (``mta.config.DrainTlsConfig``).

The endpoint's context serves this pod's certificate (``mta.smtp.tls.ServerTls``:
reloaded when cert-manager renews the files) and, with ``client_ca_file``,
requires a client certificate chaining to it; the sender's, built afresh
for each drain, verifies the endpoint's certificate and name against
``ca_file`` and presents this pod's certificate as its client certificate.

Failure: ``TlsError``, ``ssl.SSLError`` or ``OSError`` from a file that
cannot be loaded; the callers name the key (``drain.tls``).
"""

from __future__ import annotations

import ssl

from mta.config import DrainTlsConfig
from mta.smtp.tls import ServerTls


def server_tls(config: DrainTlsConfig) -> ServerTls:
    tls = ServerTls(config.cert_file, config.key_file)
    if config.client_ca_file is not None:
        tls.context.load_verify_locations(cafile=str(config.client_ca_file))
        tls.context.verify_mode = ssl.CERT_REQUIRED
    return tls


def client_context(config: DrainTlsConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(config.ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.cert_file, config.key_file)
    return context
