"""A hardened kubemta: STARTTLS submission with AUTH, implicit TLS, an untrusted relay listener."""

from __future__ import annotations

import smtplib
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from mta.auth.credentials import set_password
from tests.conftest import Fronts, World
from tests.harness import MtaServer, merge
from tests.peers.net import free_port
from tests.session import SessionServer

PASSWORD = "correct horse battery"


@dataclass
class Secure:
    world: World | None  # None: the listeners run in process (tests.session), nothing is delivered
    server: MtaServer | SessionServer
    submission: int  # STARTTLS + AUTH, nobody trusted
    submissions: int  # implicit TLS + AUTH
    relay: int  # no AUTH, trusts only 192.0.2.0/24 (nobody here)
    legacy: int  # AUTH allowed in plain text
    ca: trustme.CA
    cert: Path
    key: Path

    def client(self, port: int, *, tls: bool = False, source: str | None = None) -> smtplib.SMTP:
        client = smtplib.SMTP("127.0.0.1", port, timeout=15,
                              source_address=(source, 0) if source else None)
        client.ehlo("app.kubemta.test")
        if tls:
            client.starttls(context=self.client_context())
            client.ehlo("app.kubemta.test")
        return client

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context

    def add_user(self, name: str, password: str = PASSWORD, action: str = "add") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["python3", "-P", "-m", "mta.cli", "user", action, name, "-c", str(self.server.config_path),
             "--listener", "submission"],
            input=password + "\n", capture_output=True, text=True, timeout=60, cwd=self.server.workdir)


def write_cert(ca: trustme.CA, directory: Path) -> tuple[Path, Path]:
    cert = ca.issue_cert("mta.kubemta.test", "127.0.0.1")
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    cert.private_key_pem.write_to_path(str(key_path))
    with cert_path.open("wb") as out:
        for blob in cert.cert_chain_pems:
            out.write(blob.bytes())
    return cert_path, key_path


def make_secure(place: World | Fronts, extra: dict[str, Any] | None = None,
                users: dict[str, str] | None = None, name: str = "mta") -> Secure:
    """A real ``mta serve`` in ``place`` when it is a World; the listeners in process when it is ``front``.
    ``name``: another server in the same World, with its own certificate and credentials."""
    ca = trustme.CA()
    tls_dir = place.root / ("tls" if name == "mta" else f"tls-{name}")
    tls_dir.mkdir(exist_ok=True)
    cert, key = write_cert(ca, tls_dir)
    creds = place.root / ("credentials" if name == "mta" else f"credentials-{name}")
    creds.write_text("")
    # Hashed in process as `mta user add` hashes them; the CLI itself is tested in test_tls_auth.
    for user, password in (users or {"app": PASSWORD}).items():
        set_password(creds, user, password, create=True)
    ports = [free_port() for _ in range(3)]
    tls = {"cert_file": str(cert), "key_file": str(key)}
    auth = {"credentials_file": str(creds)}
    config = {
        "listeners": [
            {"name": "relay", "address": "127.0.0.1:{port}", "mode": "relay", "trusted_networks": ["192.0.2.0/24"],
             "tls": tls},
            {"name": "submission", "address": f"127.0.0.1:{ports[0]}", "mode": "submission", "tls": tls,
             "auth": auth},
            {"name": "submissions", "address": f"127.0.0.1:{ports[1]}", "mode": "submissions", "tls": tls,
             "auth": auth},
            {"name": "legacy", "address": f"127.0.0.1:{ports[2]}", "mode": "submission",
             "auth": {**auth, "allow_plaintext": True}},
        ],
        "limits": {"auth_failure_delay": "0.1s"},
    }
    if isinstance(place, Fronts):
        front = place(merge(config, extra or {}))
        return Secure(None, front, ports[0], ports[1], front.port, ports[2], ca, cert, key)
    server = place.mta(merge(config, extra or {}), name=name)
    return Secure(place, server, ports[0], ports[1], server.port, ports[2], ca, cert, key)


@pytest.fixture
def secure(world: World) -> Iterator[Secure]:
    yield make_secure(world)


@pytest.fixture
def secure_front(front: Fronts) -> Secure:
    """The same listeners in process, for tests of the session alone."""
    return make_secure(front)
