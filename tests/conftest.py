"""Shared fixtures: a small world of real peers around a real ``mta serve``.

``world`` starts a real DNS server (unbound) holding the test zones and
hands out real receiving MTAs (Postfix's smtp-sink) on loopback addresses,
all on one port that the MTA is told to deliver to.  Everything started is
stopped at the end of the test, by PID.

The hooks of ``tests.ci`` apply to the whole suite: a test that lacks
something skips locally (``require``), and fails in CI (``CI=true``).
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mta.dkim import keys
from tests.ci import (  # noqa: F401 -- hooks and the helper, installed for the whole suite
    pytest_runtest_makereport,
    pytest_sessionfinish,
    pytest_terminal_summary,
    require,
)
from tests.harness import MtaServer, merge
from tests.peers.dns import DnsServer
from tests.peers.net import free_port
from tests.peers.postfix import PostfixServer
from tests.peers.redis import RedisServer
from tests.peers.sink import SmtpSink
from tests.session import SessionServer

# name -> loopback address of its MX host
HOSTS = {
    "dest": "127.0.0.2",
    "sender": "127.0.0.3",
    "pref-down": "127.0.0.4",
    "pref-up": "127.0.0.5",
    "amx": "127.0.0.6",
    "postfix": "127.0.0.7",
    "reject": "127.0.0.8",
    "flaky": "127.0.0.9",
    "down": "127.0.0.10",
    "relay": "127.0.0.11",
}

ZONES = ["dest.test", "sender.test", "pref.test", "amx.test", "nullmx.test", "missing.test", "postfix.test",
         "reject.test", "flaky.test", "down.test", "deadmx.test"]

RECORDS = [
    "dest.test. IN MX 10 mx.dest.test.",
    f"mx.dest.test. IN A {HOSTS['dest']}",
    # SPF for the receiver that sends reports back (tests.integration.test_feedback_reports)
    f'dest.test. IN TXT "v=spf1 ip4:{HOSTS["dest"]} -all"',
    f'mx.dest.test. IN TXT "v=spf1 ip4:{HOSTS["dest"]} -all"',
    "sender.test. IN MX 10 mx.sender.test.",
    f"mx.sender.test. IN A {HOSTS['sender']}",
    # the preferred MX does not answer; the second one does
    "pref.test. IN MX 10 mx1.pref.test.",
    "pref.test. IN MX 20 mx2.pref.test.",
    f"mx1.pref.test. IN A {HOSTS['pref-down']}",
    f"mx2.pref.test. IN A {HOSTS['pref-up']}",
    # no MX: the domain's own address (implicit MX)
    f"amx.test. IN A {HOSTS['amx']}",
    # RFC 7505 null MX
    "nullmx.test. IN MX 0 .",
    "postfix.test. IN MX 10 mx.postfix.test.",
    f"mx.postfix.test. IN A {HOSTS['postfix']}",
    "reject.test. IN MX 10 mx.reject.test.",
    f"mx.reject.test. IN A {HOSTS['reject']}",
    "flaky.test. IN MX 10 mx.flaky.test.",
    f"mx.flaky.test. IN A {HOSTS['flaky']}",
    "down.test. IN MX 10 mx.down.test.",
    f"mx.down.test. IN A {HOSTS['down']}",
    # the only MX host name does not exist
    "deadmx.test. IN MX 10 gone.deadmx.test.",
]


@pytest.fixture
def peer_dir() -> Iterator[Path]:
    """A work folder that unprivileged peers (smtp-sink runs as nobody) can reach."""
    base = Path("/var/tmp/kubemta-tests")
    base.mkdir(mode=0o755, exist_ok=True)
    base.chmod(0o755)
    path = base / uuid.uuid4().hex[:12]
    path.mkdir(mode=0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


class World:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port(HOSTS["dest"])
        self.dns = DnsServer(RECORDS, ZONES, root / "dns")
        self.sinks: dict[str, SmtpSink] = {}
        self.servers: list[MtaServer] = []
        self.others: list[Any] = []

    def start(self) -> None:
        (self.root / "dns").mkdir()
        self.dns.start()

    def dkim_key(self, selector: str, domain: str) -> Path:
        """A new RSA signing key, its public half published at ``selector._domainkey.domain``; the key file."""
        key = keys.generate("rsa")
        path = self.root / f"{selector}.{domain}.pem"
        keys.write_private_key(key, path)
        value = keys.txt_record(key)
        chunks = " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))
        self.dns.replace_records([*RECORDS, f"{selector}._domainkey.{domain}. IN TXT {chunks}"])
        return path

    def sink(self, name: str, extra_args: list[str] | None = None) -> SmtpSink:
        """A receiving MTA for ``name``'s MX address."""
        workdir = self.root / f"sink-{name}"
        workdir.mkdir(exist_ok=True)
        sink = SmtpSink(HOSTS[name], self.port, workdir, list(extra_args or []))
        sink.start()
        self.sinks[name] = sink
        return sink

    def postfix(self) -> PostfixServer:
        """A real Postfix receiving for postfix.test at that domain's MX address."""
        workdir = self.root / "postfix"
        workdir.mkdir()
        server = PostfixServer(HOSTS["postfix"], self.port, ["postfix.test"], workdir)
        self.others.append(server)
        server.start()
        return server

    def mta(self, config: dict[str, Any] | None = None, name: str = "mta", start: bool = True) -> MtaServer:
        base = {"dns": {"nameservers": [self.dns.address]}, "delivery": {"port": self.port}}
        server = MtaServer(self.root / name, merge(base, config or {}))
        self.servers.append(server)
        if start:
            server.start()
        return server

    def close(self) -> None:
        for server in self.servers:
            server.stop()
        for sink in self.sinks.values():
            sink.stop()
        for other in self.others:
            other.stop()
        self.dns.stop()


@pytest.fixture
def world(peer_dir: Path) -> Iterator[World]:
    w = World(peer_dir)
    try:
        w.start()
        yield w
    finally:
        w.close()


@pytest.fixture
def redis(world: World) -> Iterator[RedisServer]:
    """A real Redis for the shared limits store, with a password."""
    server = RedisServer(world.root / "redis", password="limits-test-password")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def limits_store(world: World, redis: RedisServer, name: str) -> dict[str, Any]:
    """``limits.store`` for a server ``name`` of ``world``: ``redis``, its password in a file of the server's."""
    secret = world.root / f"{name}-redis-password"
    secret.write_text(f"{redis.password}\n")
    secret.chmod(0o600)
    return {"url": redis.url, "password_file": str(secret), "lease_ttl": "3s", "retry": "1s", "replicas": 2}


class Fronts:
    """In-process SMTP front ends (``tests.session``), stopped at the end of the test."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.servers: list[SessionServer] = []

    def __call__(self, config: dict[str, Any] | None = None, name: str = "front",
                 users: dict[str, tuple[str, str]] | None = None) -> SessionServer:
        """Listeners of ``config``, started; ``users``: name -> (listener, password)."""
        server = SessionServer(self.root / name, config)
        self.servers.append(server)
        for user, (listener, password) in (users or {}).items():
            server.add_user(listener, user, password)
        server.start()
        return server

    def close(self) -> None:
        for server in self.servers:
            server.stop()


@pytest.fixture
def front(peer_dir: Path) -> Iterator[Fronts]:
    fronts = Fronts(peer_dir)
    try:
        yield fronts
    finally:
        fronts.close()
