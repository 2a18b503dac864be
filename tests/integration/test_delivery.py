"""Delivery to real receiving MTAs found through a real DNS server: MX order,
fallbacks, retries, bounces and their DSNs."""

from __future__ import annotations

import email
import email.policy
import re
import smtplib
import time
from datetime import datetime

from tests.conftest import World
from tests.harness import MtaServer, send_mail
from tests.obs.logs import events, wait_for_event
from tests.peers.sink import SmtpSink


def send(server: MtaServer, sender: str, recipients: list[str], subject: str = "test") -> str:
    return send_mail(server.port, sender, recipients, subject=subject)


def dsn_parts(data: bytes) -> tuple[email.message.Message, list[email.message.Message]]:
    # The default policy unfolds fields, as a DSN reader must (RFC 3464 §2.1.1).
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    status = msg.get_payload()[1]
    assert status.get_content_type() == "message/delivery-status"
    return msg, status.get_payload()[1:]


def test_mx_preference_falls_back_when_the_first_mx_is_down(world: World) -> None:
    up = world.sink("pref-up")
    server = world.mta()
    send(server, "a@sender.test", ["user@pref.test"])
    [message] = up.wait_for_messages(1, timeout=30)
    assert message.recipients == ["user@pref.test"]
    server.wait_queue_empty()
    log = server.log()
    assert "mx1.pref.test[127.0.0.4]" in log  # it tried the preferred one first


def test_domain_without_mx_uses_its_address(world: World) -> None:
    sink = world.sink("amx")
    server = world.mta()
    send(server, "a@sender.test", ["user@amx.test"])
    assert sink.wait_for_messages(1, timeout=20)[0].recipients == ["user@amx.test"]
    server.wait_queue_empty()


def test_recipients_in_several_domains_each_get_the_message_once(world: World) -> None:
    dest, amx = world.sink("dest"), world.sink("amx")
    server = world.mta()
    send(server, "a@sender.test", ["one@dest.test", "two@dest.test", "three@amx.test"])
    [at_dest] = dest.wait_for_messages(1, timeout=20)
    assert sorted(at_dest.recipients) == ["one@dest.test", "two@dest.test"]
    assert amx.wait_for_messages(1, timeout=20)[0].recipients == ["three@amx.test"]
    server.wait_queue_empty()
    time.sleep(1)
    assert len(dest.messages()) == 1 and len(amx.messages()) == 1


MTA_SOURCE = "127.0.0.42"  # the MTA's outbound address, so the sink can tell its sessions from anyone else's


def connections_from(sink: SmtpSink, address: str) -> int:
    """Sessions the sink accepted from ``address``: with ``-v`` smtp-sink logs ``connect (AF_INET ADDR)`` for each."""
    return sink.stderr().count(f"smtp-sink: connect (AF_INET {address})")


def commands(sink: SmtpSink, start: str) -> int:
    """Commands the sink received that begin with ``start`` (its ``-v`` log echoes each as the client sent it)."""
    return len(re.findall(r"^smtp-sink: " + re.escape(start), sink.stderr(), re.IGNORECASE | re.MULTILINE))


def test_messages_to_one_destination_share_a_connection(world: World) -> None:
    sink = world.sink("dest", ["-v"])
    server = world.mta({"delivery": {"max_per_destination": 1, "source_address": MTA_SOURCE}})
    with smtplib.SMTP("127.0.0.1", server.port, timeout=20) as client:
        client.ehlo("app.kubemta.test")
        for i in range(5):
            client.sendmail("a@sender.test", ["u@dest.test"], f"Subject: {i}\r\n\r\nbody {i}\r\n")
    messages = sink.wait_for_messages(5, timeout=30)
    server.wait_queue_empty()
    assert len(events(server, "attempt")) == 5
    assert server.log().count("connect_failed") == 0
    assert {m.client_addr for m in messages} == {MTA_SOURCE}
    # Counted where the mail arrives: one session carried all five transactions.
    assert connections_from(sink, MTA_SOURCE) == 1, sink.stderr()
    assert commands(sink, "MAIL FROM:<a@sender.test>") == 5, sink.stderr()


def assert_one_dsn(sender_sink, failed_rcpt: str, status_prefix: str, text: str):  # type: ignore[no-untyped-def]
    [notice] = sender_sink.wait_for_messages(1, timeout=30)
    assert notice.sender == "" and notice.recipients == ["a@sender.test"]
    msg, blocks = dsn_parts(notice.data)
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    [block] = blocks
    assert block["Final-Recipient"] == f"rfc822; {failed_rcpt}"
    assert block["Action"] == "failed"
    assert block["Status"].startswith(status_prefix)
    assert text in block["Diagnostic-Code"]
    return msg


def test_permanent_rejection_sends_exactly_one_dsn(world: World) -> None:
    world.sink("reject", ["-f", "RCPT"])
    sender = world.sink("sender")
    server = world.mta()
    queue_id = send(server, "a@sender.test", ["nobody@reject.test"], subject="will bounce")
    msg = assert_one_dsn(sender, "nobody@reject.test", "5.", "500 5.3.0 Error: command failed")
    assert "Subject: will bounce" in msg.get_payload()[2].as_string()
    server.wait_queue_empty()
    time.sleep(2)
    assert len(sender.messages()) == 1
    assert events(server, queue_id=queue_id)


def test_null_mx_bounces(world: World) -> None:
    sender = world.sink("sender")
    server = world.mta()
    send(server, "a@sender.test", ["user@nullmx.test"])
    assert_one_dsn(sender, "user@nullmx.test", "5.1.10", "null MX")
    server.wait_queue_empty()


def test_nonexistent_domain_bounces(world: World) -> None:
    sender = world.sink("sender")
    server = world.mta()
    send(server, "a@sender.test", ["user@nothere.missing.test"])
    assert_one_dsn(sender, "user@nothere.missing.test", "5.1.2", "does not exist")
    server.wait_queue_empty()


def test_tempfail_then_success_after_flush(world: World) -> None:
    flaky = world.sink("flaky", ["-r", "RCPT"])
    server = world.mta()
    queue_id = send(server, "a@sender.test", ["user@flaky.test"])
    [item] = server.wait_for_queue(lambda q: q and q[0]["attempts"] >= 1, what="one failed attempt")
    assert item["id"] == queue_id and item["state"] == "deferred"
    assert item["recipients"][0]["last_reply"].startswith("450 4.3.0")
    assert flaky.messages() == []
    flaky.restart([])
    done = server.queue("flush")
    assert done.returncode == 0 and f"{queue_id}: ok" in done.stdout, done.stdout + done.stderr
    assert flaky.wait_for_messages(1, timeout=20)[0].recipients == ["user@flaky.test"]
    server.wait_queue_empty()


def attempt_times(server: MtaServer, queue_id: str, count: int, timeout: float) -> list[float]:
    """When the first ``count`` delivery attempts of ``queue_id`` began (the log's ``ts``), in seconds."""
    found = wait_for_event(server, "attempt", timeout=timeout, count=count, queue_id=queue_id)
    return [datetime.fromisoformat(item["ts"]).timestamp() for item in found[:count]]


def test_retry_happens_by_itself_with_backoff(world: World) -> None:
    flaky = world.sink("flaky", ["-v", "-r", "RCPT"])
    # No jitter: the delays are exactly 1 s, 2 s, 4 s ... (the scheduler never waits less than 1 s).
    server = world.mta({"queue": {"retry_initial": "1s", "retry_max": "8s", "retry_jitter": 0}})
    queue_id = send(server, "a@sender.test", ["user@flaky.test"])
    first, second, third = attempt_times(server, queue_id, 3, timeout=20)
    # Two retries, each on its own, and the second waited about twice as long as the first.
    assert 0.9 <= second - first <= 2.0, (first, second, third)
    assert 1.9 <= third - second <= 3.5, (first, second, third)
    assert third - second >= 1.5 * (second - first), (first, second, third)
    # Each attempt reached the receiver, which refused it at RCPT.
    assert commands(flaky, "RCPT TO:<user@flaky.test>") >= 3, flaky.stderr()
    assert flaky.messages() == []
    [item] = server.queue_list()
    assert item["id"] == queue_id and item["state"] == "deferred" and item["attempts"] >= 3
    flaky.restart([])
    # The next retry is due about 4 s after the third attempt; nothing is flushed.
    assert flaky.wait_for_messages(1, timeout=20)[0].recipients == ["user@flaky.test"]
    server.wait_queue_empty()
    [delivered] = events(server, "delivered", queue_id=queue_id)
    assert delivered["attempts"] >= 4


def test_message_past_its_lifetime_bounces_with_expiry_status(world: World) -> None:
    world.sink("flaky", ["-r", "RCPT"])
    sender = world.sink("sender")
    server = world.mta({"queue": {"lifetime": "3s", "retry_initial": "1s", "retry_max": "1s"}})
    send(server, "a@sender.test", ["user@flaky.test"])
    assert_one_dsn(sender, "user@flaky.test", "4.4.7", "expired")
    server.wait_queue_empty()
    assert events(server, "expired")


def test_a_bounce_is_never_bounced(world: World) -> None:
    world.sink("reject", ["-f", "RCPT"])
    sender = world.sink("sender")
    server = world.mta()
    send(server, "", ["nobody@reject.test"])
    wait_for_event(server, "bounce_suppressed")
    server.wait_queue_empty()
    time.sleep(1)
    assert sender.messages() == []


def test_dsn_that_cannot_be_delivered_is_dropped_not_bounced(world: World) -> None:
    world.sink("reject", ["-f", "RCPT"])
    server = world.mta()
    # The sender's own domain rejects too: the DSN fails and must not produce another.
    send(server, "a@reject.test", ["b@reject.test"])
    wait_for_event(server, "bounce_suppressed")
    server.wait_queue_empty()
    assert len(events(server, "queued")) == 1  # the one DSN, nothing after it


def test_outbound_connections_use_the_source_address_and_helo_name(world: World) -> None:
    sink = world.sink("dest")
    server = world.mta({"hostname": "out.kubemta.test", "delivery": {"source_address": "127.0.0.42"}})
    send(server, "a@sender.test", ["user@dest.test"])
    [message] = sink.wait_for_messages(1, timeout=20)
    assert message.client_addr == "127.0.0.42"
    assert message.helo == "out.kubemta.test"


def test_address_literal_is_delivered_to_that_address(world: World) -> None:
    sink = world.sink("dest")
    server = world.mta()
    send(server, "a@sender.test", [f"user@[{sink.host}]"])
    assert sink.wait_for_messages(1, timeout=20)[0].recipients == [f"user@[{sink.host}]"]
    server.wait_queue_empty()


def test_direct_delivery_never_connects_to_addresses_it_may_not_use(world: World) -> None:
    """An MX that points into loopback (or a private range, or 169.254.169.254) is refused
    unless delivery.allowed_networks allows it; the tests' peers live on loopback."""
    sink = world.sink("dest")
    server = world.mta({"delivery": {"allowed_networks": ["10.255.255.0/24"]}})
    queue_id = send(server, "a@sender.test", ["u@dest.test"])
    [bounced] = wait_for_event(server, "bounced", queue_id=queue_id)
    assert bounced["enhanced"] == "5.4.4" and "delivery.allowed_networks" in bounced["reply"]
    assert "not a public address" in server.log()
    time.sleep(0.5)
    assert sink.messages() == [], "nothing may reach the loopback MX"
