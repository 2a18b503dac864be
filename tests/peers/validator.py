"""A validating resolver (unbound) in front of a test's authoritative server, for DNSSEC.

Owns: one ``unbound -d`` child with its config and log under the given
workdir, listening on 127.0.0.1 and a free port.  Queries for the given
zones go to the authoritative server (stub zones, e.g. Knot with automatic
signing); the DNSKEY records given are its only trust anchors, so answers
from a zone signed with those keys come back with the AD bit, a bad
signature is SERVFAIL, and every other zone is insecure (no AD).  Outgoing
queries leave only from 127.0.0.1, so nothing reaches the internet.

How it fails: ``start`` raises RuntimeError with unbound's log when it
exits or does not answer within ``start_timeout`` seconds.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import dns.exception
import dns.message
import dns.query

from tests.peers.net import free_port
from tests.peers.process import PeerProcess


class ValidatingResolver(PeerProcess):
    host = "127.0.0.1"

    def __init__(self, workdir: Path, upstream: tuple[str, int], zones: Sequence[str], anchors: Sequence[str], *,
                 start_timeout: float = 10.0) -> None:
        self.workdir = workdir.absolute()
        self.upstream = upstream
        self.zones = [zone.rstrip(".") + "." for zone in zones]
        self.anchors = list(anchors)
        self.port = free_port(self.host, udp=True)
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "unbound.log"

    def _config(self) -> str:
        host, port = self.upstream
        lines = [
            "server:", "  verbosity: 1", "  val-log-level: 2", "  use-syslog: no", '  logfile: ""',
            '  username: ""', '  chroot: ""', f'  directory: "{self.workdir}"',
            f'  pidfile: "{self.workdir / "unbound.pid"}"', f"  interface: {self.host}", f"  port: {self.port}",
            "  do-ip6: no", "  num-threads: 1", "  so-reuseport: no", "  access-control: 127.0.0.0/8 allow",
            "  do-not-query-localhost: no", "  outgoing-interface: 127.0.0.1",
            '  module-config: "validator iterator"', "  prefetch: no", "  cache-max-ttl: 1",
            "  cache-max-negative-ttl: 1",
            # unbound answers these names itself unless told not to (RFC 6761 zones).
            '  local-zone: "test." nodefault', '  local-zone: "invalid." nodefault',
        ]
        lines += [f'  trust-anchor: "{anchor}"' for anchor in self.anchors]
        for zone in self.zones:
            lines += ["stub-zone:", f'  name: "{zone}"', f"  stub-addr: {host}@{port}"]
        lines += ["remote-control:", "  control-enable: no"]
        return "\n".join(lines) + "\n"

    def start(self) -> ValidatingResolver:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "unbound.conf"
        conf.write_text(self._config())
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(["unbound", "-d", "-c", str(conf)], stdin=subprocess.DEVNULL,
                                          stdout=log, stderr=log)
        deadline = time.monotonic() + self.start_timeout
        query = dns.message.make_query(self.zones[0], "SOA")
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"unbound exited with {self._proc.returncode}:\n{self.log_text()}")
            try:
                dns.query.udp(query, self.host, port=self.port, timeout=0.5)
                return self
            except (dns.exception.Timeout, OSError):
                pass
            if time.monotonic() >= deadline:
                self.stop()
                raise RuntimeError(f"unbound did not answer on {self.address}:\n{self.log_text()}")
            time.sleep(0.05)
