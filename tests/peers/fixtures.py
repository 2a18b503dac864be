"""pytest fixtures that start real test peers and always tear them down.

Owns: one work directory per test under /var/tmp/kubemta-tests (or
$KUBEMTA_PEERS_DIR), created mode 0755 and removed after the test, plus
every peer the factories below start during the test.  Load it with
`pytest_plugins = ["tests.peers.fixtures"]`.

Why not pytest's tmp_path: it lives under /tmp/pytest-of-root, mode 0700,
which the users the peers drop to (nobody for smtp-sink, postfix/nobody for
Postfix) cannot enter, and Postfix's maillog_file wants a path under /var by
default.  Set KUBEMTA_KEEP_PEERS=1 to keep the work directories for a look
after a failure.

How it fails: a peer that does not start raises from the factory call (its
message carries the peer's own log); teardown stops every peer created, in
reverse order, even when the test or another stop failed, and re-raises the
first stop error.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from .dns import DnsServer
from .net import free_port
from .postfix import PostfixServer
from .sink import SmtpSink

DEFAULT_PEERS_ROOT = Path("/var/tmp/kubemta-tests")


@pytest.fixture
def peer_workdir(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh directory (0755, world-searchable parents) for this test's peers."""
    root = Path(os.environ.get("KUBEMTA_PEERS_DIR", DEFAULT_PEERS_ROOT))
    root.mkdir(parents=True, exist_ok=True)
    if root.stat().st_uid == os.geteuid():
        root.chmod(0o755)
    prefix = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)[:40] + "-"
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    work.chmod(0o755)
    yield work
    if os.environ.get("KUBEMTA_KEEP_PEERS") != "1":
        shutil.rmtree(work)


@pytest.fixture
def dns_server_factory(peer_workdir: Path) -> Iterator[Callable[[Sequence[str], Sequence[str]], DnsServer]]:
    """`make(records, zones) -> DnsServer`, started on 127.0.0.1:<free port>."""
    with contextlib.ExitStack() as stack:
        counter = itertools.count(1)

        def make(records: Sequence[str], zones: Sequence[str]) -> DnsServer:
            server = DnsServer(records, zones, peer_workdir / f"dns-{next(counter)}")
            stack.callback(server.stop)  # registered first: a half-started peer is stopped too
            server.start()
            return server

        yield make


@pytest.fixture
def smtp_sink_factory(peer_workdir: Path) -> Iterator[Callable[..., SmtpSink]]:
    """`make(host="127.0.0.1", port=None, extra_args=()) -> SmtpSink`, started."""
    with contextlib.ExitStack() as stack:
        counter = itertools.count(1)

        def make(host: str = "127.0.0.1", port: int | None = None, extra_args: Sequence[str] = ()) -> SmtpSink:
            sink = SmtpSink(host, port or free_port(host), peer_workdir / f"sink-{next(counter)}", extra_args)
            stack.callback(sink.stop)
            sink.start()
            return sink

        yield make


@pytest.fixture
def postfix_factory(peer_workdir: Path) -> Iterator[Callable[..., PostfixServer]]:
    """`make(domains, host="127.0.0.1", port=None, extra_main_cf=None) -> PostfixServer`, started."""
    with contextlib.ExitStack() as stack:
        counter = itertools.count(1)

        def make(
            domains: Sequence[str],
            host: str = "127.0.0.1",
            port: int | None = None,
            extra_main_cf: dict[str, str] | None = None,
        ) -> PostfixServer:
            server = PostfixServer(
                host,
                port or free_port(host),
                domains,
                peer_workdir / f"postfix-{next(counter)}",
                extra_main_cf=extra_main_cf,
            )
            stack.callback(server.stop)
            server.start()
            return server

        yield make
