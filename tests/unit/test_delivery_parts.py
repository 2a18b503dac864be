"""Routing, retry schedule and DSN format."""

from __future__ import annotations

import email
import email.policy
import random
from datetime import UTC, datetime

from mta.bounce import dsn
from mta.config import RouteConfig
from mta.delivery.route import Router
from mta.scheduler.backoff import retry_delay


def test_routes_exact_then_wildcard_then_default_then_direct() -> None:
    exact = RouteConfig(domains=["example.com"], relay="exact.relay:25")
    wild = RouteConfig(domains=["*.corp.example"], relay="wild.relay:25")
    default = RouteConfig(domains=["*"], relay="default.relay:587")
    router = Router([exact, wild, default])
    assert router.next_hop("EXAMPLE.com").route is exact
    assert router.next_hop("a.b.corp.example").route is wild
    assert router.next_hop("other.net").route is default
    assert Router([exact]).next_hop("other.net").kind == "mx"
    assert Router([exact]).next_hop("Other.NET.").name == "other.net"


def test_backoff_doubles_from_initial_to_cap_with_bounded_jitter() -> None:
    rng = random.Random(1)
    delays = [retry_delay(n, 300, 3600, 0.2, rng) for n in range(1, 8)]
    assert 240 <= delays[0] <= 360
    assert 480 <= delays[1] <= 720
    assert all(2880 <= d <= 4320 for d in delays[4:])
    assert retry_delay(1, 300, 3600, 0.0, rng) == 300


def test_dsn_is_a_valid_multipart_report() -> None:
    when = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    raw = dsn.build(
        reporting_mta="mta.example.com", queue_id="Q1", original_sender="sender@example.com",
        original_header=b"Subject: hello\r\nMessage-ID: <orig@example.com>\r\n", arrival=when,
        recipients=[dsn.ReportedRecipient("nobody@example.net", "5.1.1", "550 5.1.1 <nobody@example.net>: User unknown",
                                    "mx.example.net[192.0.2.25]", answered=True),
                dsn.ReportedRecipient("late@example.org", "4.4.7", "4.4.7 message expired", None, expired=True)],
        now=when,
    )
    msg = email.message_from_bytes(raw)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["To"] == "<sender@example.com>"
    parts = msg.get_payload()
    assert [p.get_content_type() for p in parts] == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    blocks = parts[1].get_payload()
    assert blocks[0]["Reporting-MTA"] == "dns; mta.example.com"
    assert blocks[1]["Final-Recipient"] == "rfc822; nobody@example.net"
    assert blocks[1]["Action"] == "failed" and blocks[1]["Status"] == "5.1.1"
    assert blocks[1]["Remote-MTA"] == "dns; mx.example.net"
    assert blocks[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 <nobody@example.net>: User unknown"
    assert blocks[2]["Status"] == "4.4.7"
    assert b"Message-ID: <orig@example.com>" in raw
    assert b"\n" not in raw.replace(b"\r\n", b"")


def test_dsn_for_internationalised_mail_uses_the_global_types() -> None:
    when = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    raw = dsn.build(
        reporting_mta="mta.example.com", queue_id="Q2", original_sender="jürgen@example.com",
        original_header="Subject: Grüße\r\n".encode(), arrival=when, now=when,
        recipients=[dsn.ReportedRecipient("zoë@example.net", "5.6.7", "553 5.6.7 the message needs SMTPUTF8",
                                    "mx.example.net[192.0.2.25]")],
    )
    msg = email.message_from_bytes(raw, policy=email.policy.SMTPUTF8)
    assert "To: <jürgen@example.com>\r\n".encode() in raw
    assert [p.get_content_type() for p in msg.get_payload()] == \
        ["text/plain", "message/global-delivery-status", "message/global-headers"]
    status = raw.split(b"Final-Recipient:", 1)[1].decode("utf-8")
    assert status.startswith(" utf-8; zoë@example.net")
    # Our own failure is not blamed on the server that was reached.
    assert "Diagnostic-Code: X-Kubemta; 553 5.6.7" in status
    assert "Grüße".encode() in raw and max(len(line) for line in raw.split(b"\r\n")) <= 998
    assert dsn.needs_smtputf8("jürgen@example.com", b"", [])
    assert not dsn.needs_smtputf8("a@example.com", b"Subject: hi\r\n", [])


def test_dsn_lines_stay_short_whatever_the_reply() -> None:
    when = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    reply = "550 5.7.1 " + "x" * 3000
    raw = dsn.build(reporting_mta="mta.example.com", queue_id="Q3", original_sender="a@example.com",
                    original_header=b"Subject: t\r\n", arrival=when, now=when,
                    recipients=[dsn.ReportedRecipient("b@example.net", "5.7.1", reply, "mx[192.0.2.1]", answered=True)])
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    assert raw.isascii()


def test_direct_delivery_connects_only_to_global_or_allowed_addresses() -> None:
    import ipaddress

    from mta.delivery.client import may_connect

    allowed = [ipaddress.ip_network("10.20.0.0/16")]
    assert may_connect("8.8.8.8", []) and may_connect("2001:4860:4860::8888", [])
    for address in ("127.0.0.1", "::1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254",
                    "100.64.0.1", "fe80::1", "fd00::1", "::ffff:127.0.0.1", "0.0.0.0", "224.0.0.1"):
        assert not may_connect(address, []), address
    assert may_connect("10.20.3.4", allowed) and not may_connect("10.21.0.1", allowed)
