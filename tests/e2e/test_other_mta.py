"""Delivery to a receiving MTA of another make: chasquid, for other.test."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ci import require
from tests.e2e.chasquid import Chasquid, fetch
from tests.e2e.world import DNS_IP, HOSTS, PODS, World

VERIFIER = Path(__file__).parent.parent / "tools" / "dkimverify.pl"
USER = "e2e"


@pytest.fixture
def chasquid(world: World) -> Iterator[Chasquid]:
    binary, reason = fetch()
    require(binary is not None, reason)
    assert binary is not None
    server = Chasquid(binary, HOSTS["mx-other"][0], "other.test", [USER], world.root / "mx-other", DNS_IP,
                      world.ca)
    world.others.append(server)
    try:
        with world.lab.inside("mx-other"):
            server.start()
        yield server
    finally:
        server.stop()
        world.others.remove(server)


def test_delivery_to_chasquid(world: World, chasquid: Chasquid) -> None:
    subject = f"to chasquid {uuid.uuid4().hex[:8]}"
    world.submit([f"{USER}@other.test"], pod="mta-1", subject=subject)
    [raw] = chasquid.wait_for_mail(USER)
    assert subject.encode() in raw
    egress, helo = PODS["mta-1"]["egress"], PODS["mta-1"]["helo"]
    log = chasquid.log_text()
    assert f"queued ip={egress}:" in log, "chasquid saw the message come from mta-1's egress address"
    assert f"SMTP.Conn {egress}:" in log and f"-> EHLO {helo}" in log
    assert "jump to TLS was successful" in log, "no STARTTLS to chasquid"
    assert f"SMTP.Conn {egress}:" in log and "SPF pass" in log, "chasquid's own SPF check of the egress address"
    with world.lab.inside("app"):
        verdict = subprocess.run(["perl", str(VERIFIER), DNS_IP, "53"], input=raw, capture_output=True, timeout=30)
    assert "overall pass" in verdict.stdout.decode().splitlines(), verdict.stdout + verdict.stderr
