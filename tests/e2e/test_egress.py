"""Egress limited as the NetworkPolicy intends: the cluster host may send only DNS and SMTP.

An nftables table in the ``cluster`` namespace drops every new outbound
connection except to ports 53 (UDP and TCP) and 25; loopback and replies to
inbound connections (submission on 587) pass.  Delivery must still work, and
a connection to any other port must not get out.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import uuid
from collections.abc import Iterator

import pytest

from tests.e2e.world import HOSTS, World

TABLE = "kmta_egress"
RULES = f"""
table inet {TABLE} {{
  chain out {{
    type filter hook output priority 0; policy drop;
    oif "lo" accept
    ct state established,related accept
    meta l4proto {{ tcp, udp }} th dport 53 accept
    tcp dport 25 accept
  }}
}}
"""


@contextlib.contextmanager
def egress_policy(world: World) -> Iterator[None]:
    done = world.lab.exec("cluster", "nft", "-f", "-", input=RULES.encode())
    assert done.returncode == 0, done.stderr.decode()
    try:
        yield
    finally:
        world.lab.exec("cluster", "nft", "delete", "table", "inet", TABLE)


def can_connect(world: World, host: str, port: int, timeout: float = 2.0) -> bool:
    with world.lab.inside("cluster"), socket.socket() as sock:
        sock.settimeout(timeout)
        try:
            sock.connect((host, port))
        except OSError:
            return False
        return True


@pytest.mark.skipif(shutil.which("nft") is None, reason="nftables (nft) is not installed")
def test_delivery_works_with_only_dns_and_smtp_allowed_out(world: World) -> None:
    app = HOSTS["app"][0]
    with world.lab.inside("app"), socket.socket() as listener:
        listener.bind((app, 8443))
        listener.listen(8)
        assert can_connect(world, app, 8443), "without the policy the cluster reaches app:8443"
        with egress_policy(world):
            rcpt = f"user-{uuid.uuid4().hex[:8]}@dest.test"
            world.submit([rcpt])
            assert world.postfix is not None
            world.postfix.wait_for_mail(rcpt, timeout=30)
            assert not can_connect(world, app, 8443), "a connection to port 8443 left the cluster"
            for pod in world.pods.values():
                assert pod.readyz()[0] == 200, f"{pod.name} lost readiness under the egress policy"
