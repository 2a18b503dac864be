"""What other local users can reach of a running server started under a careless umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from mta.control import socket_path
from tests.harness import MtaServer


def test_spool_and_control_socket_are_private_under_umask_000(tmp_path: Path) -> None:
    server = MtaServer(tmp_path / "mta", {})
    old = os.umask(0)
    try:
        server.start()  # the child inherits umask 000
    finally:
        os.umask(old)
    try:
        spool = Path(server.config["spool"]["path"])
        sock = socket_path(spool)
        assert stat.S_ISSOCK(sock.stat().st_mode)
        assert sock.parent != spool and sock.parent.stat().st_mode & 0o777 == 0o700
        assert server.spool_dir.stat().st_mode & 0o777 == 0o750
        for name in ("msg", "incoming", "deferred", "hold", "tmp", "corrupt"):
            assert (server.spool_dir / name).stat().st_mode & 0o077 == 0, name
        assert server.queue_list() == []  # the CLI still finds the socket
    finally:
        server.stop()
