"""Knot DNS as the authoritative server of the small internet.

Owns: one ``knotd`` child (its own PID), its config, zone files, database
and control socket under the given workdir.  It serves the zones it is
given, answers REFUSED for everything else and never recurses (Knot is
authoritative only).  ``publish()`` rewrites the zone files with a higher
serial, asks ``knotc zone-reload`` and waits until the new serial is served,
so a test that changes DNS knows the change is visible when it returns.

It is started inside a host's namespace by the caller (the process keeps the
namespace of whoever started it) and listens on ``address``:53 (or ``port``).
Zones named in ``signed`` are DNSSEC-signed by Knot itself (automatic
signing, one ECDSA P-256 key per zone); ``dnskeys`` gives their keys, to be
used as a validating resolver's trust anchors.

How it fails: ``start()`` raises RuntimeError with knotd's log when it exits
or does not answer within ``start_timeout``; ``publish()`` raises
TimeoutError with the log when the new serial does not show up in time.
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

from tests.peers.process import PeerProcess

TTL = 1
NS = "ns.test."  # the world publishes its address


def _fqdn(name: str) -> str:
    return name if name.endswith(".") else name + "."


class KnotServer(PeerProcess):
    def __init__(self, address: str, workdir: Path, zones: Sequence[str], *, start_timeout: float = 15.0,
                 port: int = 53, signed: Sequence[str] = ()) -> None:
        self.address = address
        self.port = port
        self.signed = {_fqdn(z).lower() for z in signed}
        self.workdir = workdir
        self.zones = [_fqdn(z).lower() for z in zones]
        self.start_timeout = start_timeout
        self.serial = int(time.time()) % 1_000_000_000
        self.records: list[str] = []
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "knotd.log"

    @property
    def socket(self) -> Path:
        return self.workdir / "knot.sock"

    def _config(self) -> str:
        zones = "".join(f"  - domain: {zone}\n" + ("    dnssec-signing: on\n    dnssec-policy: tests\n"
                                                    if zone in self.signed else "") for zone in self.zones)
        return (
            "server:\n"
            f"    listen: {self.address}@{self.port}\n"
            f"    rundir: {self.workdir}\n"
            "database:\n"
            f"    storage: {self.workdir / 'db'}\n"
            "control:\n"
            f"    listen: {self.socket}\n"
            "log:\n"
            "  - target: stderr\n"
            "    any: info\n"
            "template:\n"
            "  - id: default\n"
            f"    storage: {self.workdir / 'zones'}\n"
            '    file: "%s.zone"\n'
            "    zonefile-sync: -1\n"
            "    zonefile-load: whole\n"
            "    journal-content: none\n"
            "    semantic-checks: off\n"
            "policy:\n"
            "  - id: tests\n"
            "    algorithm: ecdsap256sha256\n"
            "    single-type-signing: on\n"
            "zone:\n" + zones
        )

    def _zone_of(self, owner: str) -> str | None:
        """The most specific of our zones that holds ``owner``."""
        matches = [z for z in self.zones if owner == z or owner.endswith("." + z)]
        return max(matches, key=len) if matches else None

    def _zone_file(self, zone: str) -> str:
        lines = [f"$TTL {TTL}",
                 f"{zone} IN SOA {NS} hostmaster.{zone} {self.serial} 3600 600 86400 {TTL}",
                 f"{zone} IN NS {NS}"]
        lines += [rr for rr in self.records if self._zone_of(_fqdn(rr.split(None, 1)[0]).lower()) == zone]
        return "\n".join(lines) + "\n"

    def _check(self, records: Sequence[str]) -> None:
        for rr in records:
            if self._zone_of(_fqdn(rr.split(None, 1)[0]).lower()) is None:
                raise ValueError(f"record outside every zone {self.zones}: {rr!r}")

    def _write(self) -> None:
        zones_dir = self.workdir / "zones"
        zones_dir.mkdir(parents=True, exist_ok=True)
        for zone in self.zones:
            (zones_dir / f"{zone}zone").write_text(self._zone_file(zone))

    def start(self, records: Sequence[str]) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "db").mkdir(exist_ok=True)
        self._check(records)
        self.records = list(records)
        self._write()
        conf = self.workdir / "knot.conf"
        conf.write_text(self._config())
        check = subprocess.run(["knotc", "-c", str(conf), "conf-check"], capture_output=True, text=True, timeout=20)
        if check.returncode != 0:
            raise RuntimeError(f"knot config does not check: {check.stdout}{check.stderr}")
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(["knotd", "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=log)
        try:
            self._wait_serial(self.serial, self.start_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_serial(self, serial: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"knotd exited with {self._proc.returncode}:\n{self.log_text()}")
            # Signing may raise a zone's serial past the file's.
            if all((self._zone_serial(zone) or 0) >= serial for zone in self.zones):
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"knotd does not serve serial {serial} after {timeout}s:\n{self.log_text()}")
            time.sleep(0.05)

    def _zone_serial(self, zone: str) -> int | None:
        query = dns.message.make_query(zone, dns.rdatatype.SOA)
        try:
            answer = dns.query.udp(query, self.address, port=self.port, timeout=0.5)
        except (dns.exception.Timeout, OSError):
            return None
        for rrset in answer.answer:
            for rdata in rrset:
                return int(rdata.serial)
        return None

    def publish(self, records: Sequence[str], timeout: float = 15.0) -> None:
        """Serve ``records`` from now on (reload with a new serial, then wait for it)."""
        self._check(records)
        self.records = list(records)
        self.serial += 1
        self._write()
        done = subprocess.run(["knotc", "-s", str(self.socket), "zone-reload"], capture_output=True, text=True,
                              timeout=20)
        if done.returncode != 0:
            raise RuntimeError(f"knotc zone-reload failed: {done.stdout}{done.stderr}\n{self.log_text()}")
        self._wait_serial(self.serial, timeout)

    def dnskeys(self, zone: str) -> list[str]:
        """The zone's DNSKEY records as served, in zone-file form."""
        query = dns.message.make_query(_fqdn(zone), dns.rdatatype.DNSKEY)
        answer = dns.query.tcp(query, self.address, port=self.port, timeout=5)
        return [f"{rrset.name} {rrset.ttl} IN DNSKEY {rdata}" for rrset in answer.answer for rdata in rrset
                if rrset.rdtype == dns.rdatatype.DNSKEY]
