"""A small internet of network namespaces joined by one bridge.

Owns: every namespace and link it creates, all named ``kmta-<run id>-*``:
one ``...-net`` namespace holding the bridge ``br0``, and one namespace
per host, each joined to the bridge by a veth pair (``eth0`` in the host,
``v-<host>`` on the bridge).  All hosts share one Ethernet segment, and each
host has a link route for every documentation range (192.0.2.0/24,
198.51.100.0/24, 203.0.113.0/24), so hosts in different ranges reach one
another directly without a router.  Nothing is added to the machine's own
namespace: both ends of each veth pair are moved away at once.

``inside(host)`` switches the calling (main) thread into a host's namespace
for the duration of a ``with`` block, so that sockets opened and processes
started there belong to that host; /proc/net then shows that host's tables,
which the peers in tests.peers rely on when they check their listeners.

How it fails: ``Lab.build`` raises RuntimeError with the failing ``ip``
command's output; ``Lab.destroy`` never raises and deletes every namespace
it made (deleting a namespace deletes its veth ends and the bridge), so a
half-built lab is torn down too.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

CLONE_NEWNET = 0x40000000
RANGES = ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")
PREFIX = "kmta-"

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def available() -> str | None:
    """None when namespaces can be built here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "the e2e suite needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    probe = f"{PREFIX}probe-{uuid.uuid4().hex[:6]}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        return f"`ip netns add` does not work here: {done.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    return None


def run(*argv: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


@dataclass
class Host:
    name: str
    netns: str
    addresses: list[str] = field(default_factory=list)


class Lab:
    """Namespaces ``kmta-<id>-<host>`` on one bridge; ``destroy()`` removes them all."""

    def __init__(self) -> None:
        self.run_id = uuid.uuid4().hex[:6]
        self.bridge_ns = f"{PREFIX}{self.run_id}-net"
        self.hosts: dict[str, Host] = {}
        self.created: list[str] = []

    def _ns(self, name: str) -> str:
        return f"{PREFIX}{self.run_id}-{name}"

    def build(self, hosts: dict[str, list[str]]) -> None:
        """Create the bridge and one namespace per host with its addresses (CIDR-less IPs)."""
        run("ip", "netns", "add", self.bridge_ns)
        self.created.append(self.bridge_ns)
        run("ip", "-n", self.bridge_ns, "link", "set", "lo", "up")
        run("ip", "-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.bridge_ns, "link", "set", "br0", "up")
        for index, (name, addresses) in enumerate(hosts.items()):
            netns = self._ns(name)
            run("ip", "netns", "add", netns)
            self.created.append(netns)
            # Both ends are created inside the bridge namespace, so the
            # machine's own namespace never holds them, even briefly.
            outer = f"v{index}-{name}"[:15]
            run("ip", "-n", self.bridge_ns, "link", "add", outer, "type", "veth", "peer", "name", "eth0",
                "netns", netns)
            run("ip", "-n", self.bridge_ns, "link", "set", outer, "master", "br0", "up")
            run("ip", "-n", netns, "link", "set", "lo", "up")
            run("ip", "-n", netns, "link", "set", "eth0", "up")
            for address in addresses:
                run("ip", "-n", netns, "addr", "add", f"{address}/32", "dev", "eth0")
            for cidr in RANGES:
                run("ip", "-n", netns, "route", "add", cidr, "dev", "eth0", "scope", "link")
            self.hosts[name] = Host(name, netns, list(addresses))

    def destroy(self) -> list[str]:
        """Delete every namespace made here; returns the errors (never raises)."""
        errors = []
        for netns in reversed(self.created):
            done = subprocess.run(["ip", "netns", "del", netns], capture_output=True, text=True, timeout=20)
            if done.returncode != 0 and netns in _list():
                errors.append(f"ip netns del {netns}: {done.stderr.strip()}")
        self.created.clear()
        return errors

    def netns(self, host: str) -> str:
        return self.hosts[host].netns

    def address(self, host: str) -> str:
        return self.hosts[host].addresses[0]

    @contextlib.contextmanager
    def inside(self, host: str) -> Iterator[None]:
        """Run the ``with`` block (and the processes it starts) in ``host``'s namespace."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("inside() switches the main thread only (/proc/net follows it)")
        original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.netns(host)}", os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(original)
        finally:
            os.close(target)
            os.close(original)

    def exec(self, host: str, *argv: str, timeout: float = 30.0,
             input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        """Run a command on ``host`` and wait for it (bounded)."""
        return subprocess.run(["ip", "netns", "exec", self.netns(host), *argv], capture_output=True,
                              timeout=timeout, input=input)


def _list() -> set[str]:
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    return {line.split()[0] for line in done.stdout.splitlines() if line.strip()}


def leftovers() -> set[str]:
    """Namespaces named like ours that still exist (for a final check)."""
    return {name for name in _list() if name.startswith(PREFIX)}

