"""The log as an operator reads it: JSON lines, one event each, joined by queue id."""

from __future__ import annotations

import json
import smtplib

from tests.conftest import HOSTS, World
from tests.harness import HOST, send_mail
from tests.obs.logs import events, records, wait_for_event
from tests.peers.net import free_port

SECRET_BODY = "body-text-that-must-never-be-logged-7f3a"


def test_every_event_type_is_json_with_the_documented_fields(world: World) -> None:
    world.sink("dest")
    world.sink("reject", ["-f", "RCPT"])
    world.sink("sender")
    world.sink("flaky", ["-r", "RCPT"])  # 450 at RCPT: deferred until it expires
    strict = free_port(HOST)
    server = world.mta({
        "queue": {"lifetime": "3s", "retry_initial": "1s", "retry_max": "1s", "retry_jitter": 0},
        "listeners": [
            {"name": "relay", "address": f"{HOST}:{{port}}", "trusted_networks": ["127.0.0.0/8"]},
            {"name": "strict", "address": f"{HOST}:{strict}", "trusted_networks": ["192.0.2.0/24"]},
        ],
    })
    good = send_mail(server.port, "a@sender.test", ["user@dest.test"], body=SECRET_BODY + "\r\n")
    bad = send_mail(server.port, "a@sender.test", ["nobody@reject.test"])
    late = send_mail(server.port, "a@sender.test", ["user@flaky.test"])
    with smtplib.SMTP(HOST, strict, timeout=10) as client:
        client.ehlo("app.kubemta.test")
        client.mail("a@sender.test")
        assert client.rcpt("x@dest.test")[0] == 554
    wait_for_event(server, "expired", timeout=30, queue_id=late)
    server.wait_queue_empty(timeout=30)

    text = server.log()
    lines = [line for line in text.splitlines() if line and not line.startswith("---- start")]
    assert lines and all(isinstance(json.loads(line), dict) for line in lines), "every line is one JSON object"
    for item in records(text):
        assert {"ts", "level", "logger"} <= item.keys()
        assert "message" in item
    assert SECRET_BODY not in text

    common = {"ts", "level", "event", "queue_id"}
    [received] = events(server, "received", queue_id=good)
    assert common | {"listener", "client", "sender", "recipients", "size", "tls"} <= received.keys()
    assert received["sender"] == "a@sender.test" and received["listener"] == "relay"
    [attempt] = events(server, "attempt", queue_id=good)
    assert common | {"remote", "tls", "size", "recipients"} <= attempt.keys()
    [delivered] = events(server, "delivered", queue_id=good)
    assert common | {"sender", "recipient", "remote", "mx_host", "mx_ip", "tls", "reply", "code", "enhanced",
                     "delay", "size"} <= delivered.keys()
    assert delivered["mx_host"] == "mx.dest.test" and delivered["mx_ip"] == HOSTS["dest"]
    assert delivered["code"] == 250 and delivered["enhanced"].startswith("2.")
    assert isinstance(delivered["delay"], float) and delivered["size"] == received["size"]
    [bounced] = events(server, "bounced", queue_id=bad)
    assert bounced["code"] // 100 == 5 and bounced["enhanced"].startswith("5.")
    assert bounced["recipient"] == "nobody@reject.test"
    deferred = events(server, "deferred", queue_id=late)
    assert deferred and deferred[0]["code"] == 450 and deferred[0]["mx_host"] == "mx.flaky.test"
    [expired] = events(server, "expired", queue_id=late)
    assert expired["enhanced"] == "4.4.7" and "delay" in expired
    dsns = events(server, "queued")
    assert sorted(item["dsn_for"] for item in dsns) == sorted([bad, late])
    assert all({"queue_id", "sender", "size"} <= item.keys() for item in dsns)
    [rejected] = events(server, "rejected", listener="strict")
    assert rejected["reply"].startswith("554 5.7.1") and rejected["recipient"].strip("<>") == "x@dest.test"

    # One message's whole history, by its queue id, in order.
    history = [item["event"] for item in records(text)
               if item.get("queue_id") == good and item["event"] != "attempt_done"]  # debug level
    assert history[:3] == ["received", "attempt", "delivered"] and history[-1] == "removed"
    assert all(good in line for line in lines if f'"queue_id":"{good}"' in line)


def test_text_format_on_request(world: World) -> None:
    world.sink("dest")
    server = world.mta({"log": {"format": "text"}})
    queue_id = send_mail(server.port, "a@sender.test", ["user@dest.test"])
    server.wait_queue_empty()
    log = server.log()
    assert f"event=received queue_id={queue_id}" in log
    assert f"event=delivered queue_id={queue_id}" in log
    # (mta.cli sets JSON up before the configuration's format applies: one asyncio
    # debug line may precede the switch; no event is logged as JSON)
    assert [item for item in records(log) if "event" in item] == []


def test_failed_mx_connections_carry_the_queue_id(world: World) -> None:
    """``grep QUEUEID`` finds the lines about each mail exchanger that did not answer, not only the event."""
    server = world.mta()
    queue_id = send_mail(server.port, "a@sender.test", ["user@down.test"])
    wait_for_event(server, "connect_failed", queue_id=queue_id)
    about_mx = [r for r in records(server.log()) if "event" not in r and "mx.down.test" in r.get("message", "")]
    assert about_mx, "the failed connection to mx.down.test is logged"
    assert all(r.get("queue_id") == queue_id for r in about_mx), about_mx
    unrelated = [r for r in records(server.log()) if r.get("message", "").startswith("started")]
    assert all("queue_id" not in r for r in unrelated)
