"""Direct delivery from the pods' egress addresses to real receiving MTAs."""

from __future__ import annotations

import email
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.e2e.world import DNS_IP, HOSTS, PODS, SENDER, World

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
    # Postfix's own Received header (the newest one) names the HELO and the address it saw.
    received = " ".join(str(email.message_from_bytes(raw).get_all("Received", [""])[0]).split())
    assert received.startswith(f"from {helo} (unknown [{egress}])"), received
    assert "(using TLS" in received, f"Postfix saw no STARTTLS: {received}"
    with world.lab.inside("app"):
        verdict = subprocess.run(["perl", str(VERIFIER), DNS_IP, "53"], input=raw, capture_output=True, timeout=30)
    lines = verdict.stdout.decode().splitlines()
    assert "rsa-sha256 pass shop.test e2e" in lines and "overall pass" in lines, verdict.stdout + verdict.stderr


def dsns_for(world: World, original_rcpt: str) -> list[bytes]:
    """Bounces that reached the sender's mailbox at the sending domain's MX and name ``original_rcpt``."""
    assert world.postfix is not None
    return [raw for raw in world.postfix.mailbox(SENDER) if original_rcpt.encode() in raw]


def wait_dsn(world: World, original_rcpt: str, timeout: float = 30.0) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = dsns_for(world, original_rcpt)
        if found:
            return found[0]
        time.sleep(0.2)
    raise TimeoutError(f"no bounce for {original_rcpt} reached {SENDER} at mx-postfix in {timeout}s")


def assert_one_dsn(world: World, original_rcpt: str, status: str) -> bytes:
    dsn = wait_dsn(world, original_rcpt)
    time.sleep(5)  # longer than queue.retry_max: a second bounce would be here by now
    assert len(dsns_for(world, original_rcpt)) == 1, "more than one bounce arrived"
    assert dsn.startswith(b"Return-Path: <>"), dsn[:300]
    assert b"multipart/report" in dsn and b"message/delivery-status" in dsn, dsn[:2000]
    assert f"Status: {status}".encode() in dsn, dsn[:3000]
    return dsn


def test_mx_preference_and_fallback_when_the_first_mx_is_down(world: World) -> None:
    rcpt = f"user-{token()}@pref.test"
    qid = world.submit([rcpt])
    assert world.postfix is not None
    world.postfix.wait_for_mail(rcpt, timeout=40)
    delivered = world.pods["mta-0"].wait_event("delivered", queue_id=qid)
    assert delivered["mx_host"] == "mx2.pref.test", delivered
    assert delivered["mx_ip"] == HOSTS["mx-postfix"][0], delivered
    # the least preferred MX (which rejects everything) was never tried
    assert not [m for m in world.sinks["mx-reject"].messages() if rcpt in m.recipients]


def test_a_record_fallback_without_mx(world: World) -> None:
    rcpt = f"user-{token()}@amx.test"
    qid = world.submit([rcpt])
    assert world.postfix is not None
    world.postfix.wait_for_mail(rcpt, timeout=30)
    delivered = world.pods["mta-0"].wait_event("delivered", queue_id=qid)
    assert (delivered["mx_host"], delivered["mx_ip"]) == ("amx.test", HOSTS["mx-postfix"][0]), delivered


def test_null_mx_bounces_at_once(world: World) -> None:
    rcpt = f"user-{token()}@nullmx.test"
    qid = world.submit([rcpt])
    bounced = world.pods["mta-0"].wait_event("bounced", queue_id=qid)
    assert bounced["enhanced"] == "5.1.10", bounced
    assert_one_dsn(world, rcpt, "5.1.10")


def test_tempfail_then_success(world: World) -> None:
    sink = world.restart_sink("mx-flaky", ["-r", "RCPT"])
    rcpt = f"user-{token()}@flaky.test"
    try:
        qid = world.submit([rcpt])
        deferred = world.pods["mta-0"].wait_event("deferred", queue_id=qid)
        assert str(deferred["code"]).startswith("4"), deferred
        assert not [m for m in sink.messages() if rcpt in m.recipients]
    finally:
        sink = world.restart_sink("mx-flaky", [])
    world.pods["mta-0"].wait_event("delivered", queue_id=qid, timeout=30)
    got = [m for m in sink.wait_for_messages(1, timeout=10) if rcpt in m.recipients]
    assert len(got) == 1, got
    assert (got[0].client_addr, got[0].helo) == (PODS["mta-0"]["egress"], PODS["mta-0"]["helo"])
    world.pods["mta-0"].wait_queue(lambda q: all(i["id"] != qid for i in q), what="message gone from the queue")


def test_permanent_reject_sends_one_dsn_to_the_senders_mx(world: World) -> None:
    rcpt = f"user-{token()}@reject.test"
    qid = world.submit([rcpt], subject="will bounce")
    bounced = world.pods["mta-0"].wait_event("bounced", queue_id=qid)
    assert str(bounced["code"]).startswith("5") and bounced["mx_host"] == "mx.reject.test", bounced
    dsn = assert_one_dsn(world, rcpt, "5.")
    assert b"will bounce" in dsn, "the DSN carries the original headers"
