"""Direct delivery from the pods' egress addresses to real receiving MTAs."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest

from tests.e2e.world import DNS_IP, PODS, POSTFIX_IP, SENDER, World

VERIFIER = Path(__file__).parent.parent / "tools" / "dkimverify.pl"


def token() -> str:
    return uuid.uuid4().hex[:8]


@pytest.mark.parametrize("pod", list(PODS))
def test_direct_delivery_from_the_pods_egress_address_signed(world: World, pod: str) -> None:
    rcpt = f"user-{token()}@dest.test"
    world.submit([rcpt], pod=pod, subject="direct", body="Invoice attached.\n\nThanks")
    postfix = world.postfix
    assert postfix is not None
    [raw] = postfix.wait_for_mail(rcpt, timeout=30)
    egress, helo = PODS[pod]["egress"], PODS[pod]["helo"]
    connects = [line for line in postfix.log_lines() if f"connect from unknown[{egress}]" in line]
    assert connects, f"Postfix never logged a connection from {egress}"
    # The PTR of the egress address is the HELO name the pod gave.
    assert world.resolve(f"{'.'.join(reversed(egress.split('.')))}.in-addr.arpa.", "PTR") == [helo + "."]
    received = raw.split(b"\nReceived:", 1)[0] if raw.startswith(b"Received:") else raw.split(b"Received:", 1)[1]
    assert f"from {helo} (unknown [{egress}])".encode() in received, received[:400]
    assert b"(using TLS" in raw.split(b"DKIM-Signature:", 1)[0], "Postfix saw no STARTTLS"
    with world.lab.inside("app"):
        verdict = subprocess.run(["perl", str(VERIFIER), DNS_IP, "53"], input=raw, capture_output=True, timeout=30)
    lines = verdict.stdout.decode().splitlines()
    assert "rsa-sha256 pass shop.test e2e" in lines and "overall pass" in lines, verdict.stdout + verdict.stderr
    assert POSTFIX_IP
    assert SENDER
