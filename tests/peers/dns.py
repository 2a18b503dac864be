"""A real, private DNS server (unbound) that serves only the test's data.

Owns: one `unbound -d -c CONF` child per DnsServer, its config, log and pid
file under the given workdir, and its loopback port (kept across
`replace_records`).  It is authoritative (static local-zones) for the given
zones: a name inside a zone without data answers NXDOMAIN, a name with data
but not the asked type answers NOERROR/no data, and every name outside the
zones is REFUSED (or NXDOMAIN in unbound's built-in RFC 6761 / AS112 zones).
It never recurses: `local-zone: "." refuse` catches everything else, the
validator module is off, and outgoing queries could only leave from
127.0.0.1, so nothing can reach the internet.

How it fails: constructing with a record outside every zone, or with a zone
list that is empty, raises ValueError; `start()` raises RuntimeError carrying
unbound's stderr if unbound exits or no query is answered within
`start_timeout` seconds (the child is stopped first).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rdatatype

from .net import free_port
from .process import PeerProcess

UNBOUND = "unbound"

# unbound's built-in local zones (unbound.conf(5), "default zones").  A
# built-in zone that lies *below* one of our zones would shadow our data
# (unbound picks the most specific zone), e.g. "127.in-addr.arpa." under a
# test zone "in-addr.arpa.", so those get `nodefault`.
_DEFAULT_ZONES: tuple[str, ...] = (
    "localhost.",
    "127.in-addr.arpa.",
    "1." + "0." * 31 + "ip6.arpa.",
    "0." * 32 + "ip6.arpa.",
    "home.arpa.",
    "resolver.arpa.",
    "service.arpa.",
    "onion.",
    "test.",
    "invalid.",
    "10.in-addr.arpa.",
    *(f"{i}.172.in-addr.arpa." for i in range(16, 32)),
    "168.192.in-addr.arpa.",
    "0.in-addr.arpa.",
    "254.169.in-addr.arpa.",
    "2.0.192.in-addr.arpa.",
    "100.51.198.in-addr.arpa.",
    "113.0.203.in-addr.arpa.",
    "255.255.255.255.in-addr.arpa.",
    *(f"{i}.100.in-addr.arpa." for i in range(64, 128)),
    "d.f.ip6.arpa.",
    "8.e.f.ip6.arpa.",
    "9.e.f.ip6.arpa.",
    "a.e.f.ip6.arpa.",
    "b.e.f.ip6.arpa.",
    "8.b.d.0.1.0.0.2.ip6.arpa.",
)


def _fqdn(name: str) -> str:
    name = name.strip().lower()
    return name if name.endswith(".") else name + "."


def _within(name: str, zone: str) -> bool:
    return zone == "." or name == zone or name.endswith("." + zone)


def _quote(text: str) -> str:
    """Quote a config value; TXT data carries double quotes, so use single."""
    if '"' not in text:
        return f'"{text}"'
    if "'" in text:
        raise ValueError(f"unbound config cannot quote a value with both quote kinds: {text!r}")
    return f"'{text}'"


class DnsServer(PeerProcess):
    """unbound on 127.0.0.1:port, authoritative for `zones`, serving `records`."""

    host = "127.0.0.1"

    def __init__(
        self,
        records: Sequence[str],
        zones: Sequence[str],
        workdir: Path,
        *,
        port: int | None = None,
        host: str | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        self.workdir = Path(workdir).absolute()  # paths go into configs and /proc checks
        if host is not None:
            self.host = host  # e.g. a 127.x address of its own, for a peer that can only ask port 53
        self.port = port if port is not None else free_port(self.host, udp=True)
        self.start_timeout = start_timeout
        self.zones: list[str] = []
        self.records: list[str] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._set_data(records, zones)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def conf_path(self) -> Path:
        return self.workdir / "unbound.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / "unbound.log"

    def _set_data(self, records: Sequence[str], zones: Sequence[str]) -> None:
        zones = [_fqdn(z) for z in zones]
        if not zones:
            raise ValueError("DnsServer needs at least one zone to be authoritative for")
        for rr in records:
            owner = _fqdn(rr.split(None, 1)[0])
            if not any(_within(owner, z) for z in zones):
                # unbound would make a transparent zone for it and try to
                # recurse for other types; refuse that configuration.
                raise ValueError(f"record owner {owner} is outside every zone {zones}: {rr!r}")
        self.zones = zones
        self.records = list(records)

    def _config(self) -> str:
        lines = [
            "server:",
            "  verbosity: 1",
            "  log-queries: yes",
            "  use-syslog: no",
            '  logfile: ""',
            '  username: ""',
            '  chroot: ""',
            f'  directory: "{self.workdir}"',
            f'  pidfile: "{self.workdir / "unbound.pid"}"',
            f"  interface: {self.host}",
            f"  port: {self.port}",
            "  do-ip4: yes",
            "  do-ip6: no",
            "  do-udp: yes",
            "  do-tcp: yes",
            "  num-threads: 1",
            "  so-reuseport: no",
            "  access-control: 127.0.0.0/8 allow",
            "  do-not-query-localhost: no",
            # Belt and braces: even if something did recurse, queries could
            # only leave from loopback, which the kernel will not route out.
            "  outgoing-interface: 127.0.0.1",
            '  module-config: "iterator"',
            "  prefetch: no",
            "  minimal-responses: no",
            '  local-zone: "." refuse',
        ]
        for default in _DEFAULT_ZONES:
            if default not in self.zones and any(_within(default, z) for z in self.zones):
                lines.append(f'  local-zone: "{default}" nodefault')
        for zone in self.zones:
            lines.append(f'  local-zone: "{zone}" static')
            has_soa = any(_fqdn(rr.split(None, 1)[0]) == zone and "SOA" in rr.upper().split() for rr in self.records)
            if not has_soa:
                # A SOA makes negative answers carry a (short) negative TTL,
                # as a real authoritative server's would.
                lines.append(f'  local-data: "{zone} 3600 IN SOA ns.{zone} hostmaster.{zone} 1 3600 600 86400 5"')
        lines.extend(f"  local-data: {_quote(rr)}" for rr in self.records)
        lines.append("remote-control:")
        lines.append("  control-enable: no")
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            raise RuntimeError(f"DnsServer on {self.address} already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(self._config())
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [UNBOUND, "-d", "-c", str(self.conf_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        """Wait until a real query is answered over UDP, then check TCP once."""
        query = dns.message.make_query(self.zones[0], dns.rdatatype.SOA)
        deadline = time.monotonic() + self.start_timeout
        assert self._proc is not None
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"unbound exited with status {self._proc.returncode} before answering on {self.address}:\n"
                    f"{self.log_text()}"
                )
            try:
                dns.query.udp(query, self.host, port=self.port, timeout=0.3)
                break
            except (dns.exception.Timeout, OSError):
                pass
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"unbound did not answer on {self.address} within {self.start_timeout:.1f}s:\n{self.log_text()}"
                )
            time.sleep(0.05)
        try:
            dns.query.tcp(query, self.host, port=self.port, timeout=max(1.0, deadline - time.monotonic()))
        except (dns.exception.Timeout, OSError) as exc:
            raise RuntimeError(f"unbound answers UDP but not TCP on {self.address}: {exc}\n{self.log_text()}") from exc


    def replace_records(self, records: Sequence[str], zones: Sequence[str] | None = None) -> None:
        """Serve new data (and optionally new zones) on the same port; restarts unbound."""
        self._set_data(records, self.zones if zones is None else zones)
        running = self._proc is not None and self._proc.poll() is None
        if running:
            self.stop()
            self.start()
