"""The observability parts on their own: log lines, labels, reserves, signatures, config."""

from __future__ import annotations

import io
import json
import logging
import os

import pytest

from mta import config, replies
from mta.config import DiskConfig
from mta.obs import log as obs_log
from mta.obs.disk import DiskGuard, reserve_amount
from mta.obs.metrics import Metrics, reason_label
from mta.obs.webhooks import sign, verify
from mta.policy.admission import storage
from mta.replies import Rejected


@pytest.fixture
def json_log() -> io.StringIO:
    stream = io.StringIO()
    obs_log.setup("info", "json", stream)
    yield stream
    obs_log.setup("warning", "text")


def test_an_event_is_one_json_line_with_event_and_queue_id(json_log: io.StringIO) -> None:
    obs_log.event("delivered", queue_id="Q1", recipient="a@b.test", code=250, tls=True, skipped=None,
                  password="hunter2")
    logging.getLogger("x").warning("plain %s", "line")
    first, second = [json.loads(line) for line in json_log.getvalue().splitlines()]
    assert first["event"] == "delivered" and first["queue_id"] == "Q1"
    assert first["code"] == 250 and first["tls"] is True and "skipped" not in first
    assert first["password"] == "[redacted]" and "hunter2" not in json_log.getvalue()
    assert first["message"].startswith("event=delivered queue_id=Q1 ")
    assert second == {"ts": second["ts"], "level": "warning", "logger": "x", "pid": os.getpid(),
                      "message": "plain line"}


def test_a_failing_subscriber_never_breaks_the_caller(json_log: io.StringIO) -> None:
    seen = []

    def broken(name: str, fields: dict) -> None:
        raise RuntimeError("boom")

    obs_log.subscribe(broken)
    obs_log.subscribe(lambda name, fields: seen.append(name))
    try:
        obs_log.event("received", queue_id="Q2")
    finally:
        obs_log._subscribers.clear()
    assert seen == ["received"]
    assert "event subscriber" in json_log.getvalue()


def test_labels_stay_bounded() -> None:
    metrics = Metrics(domains=["gmail.com"])
    assert metrics.domain_label("someone@GMail.com") == "gmail.com"
    assert metrics.domain_label("someone@example.org") == "other"
    assert metrics.domain_label(None) == "other"
    assert reason_label(str(replies.RELAY_DENIED)) == "relay_denied"
    assert reason_label("554 5.7.1 something new") == "554_5.7.1"
    assert reason_label("garbage") == "other"
    assert reason_label("550 5.1.1") == "550_5.1.1"
    assert reason_label("550 no enhanced code here") == "other"
    assert reason_label(None) == "other"


def test_events_feed_counters() -> None:
    metrics = Metrics(domains=["dest.test"], listeners=["relay"])
    metrics.on_event("received", {"listener": "relay"})
    metrics.on_event("delivered", {"recipient": "u@dest.test", "delay": 1.5})
    metrics.on_event("self_check", {"check": "fcrdns", "status": "fail"})
    metrics.on_event("self_check", {"check": "spf:example.com", "status": "pass"})
    text = metrics.render().decode()
    assert 'kubemta_messages_received_total{listener="relay",result="accepted"} 1.0' in text
    assert 'kubemta_delivery_latency_seconds_count{domain="dest.test"} 1.0' in text
    assert 'kubemta_selfcheck_ok{check="fcrdns"} 0.0' in text
    assert 'kubemta_selfcheck_ok{check="spf:example.com"} 1.0' in text


def test_reserves_in_bytes_or_percent(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert reserve_amount("5%", 1000) == 50
    assert reserve_amount(300, 1000) == 300
    assert config.load(None, {"MTA__DISK__MIN_FREE": "512K"}).disk.min_free == 512 * 1024
    with pytest.raises(config.ConfigError, match=r"disk\.min_free"):
        config.load(None, {"MTA__DISK__MIN_FREE": "150%"})
    guard = DiskGuard(tmp_path, DiskConfig(min_free="0%", min_free_inodes=0))
    assert guard.ready()[0] and storage(guard.ready, "relay")() is None
    full = DiskGuard(tmp_path, DiskConfig(min_free="99.9%", min_free_inodes=0, check_interval=0))
    with pytest.raises(Rejected) as caught:
        storage(full.ready, "relay")()
    assert caught.value.reply is replies.INSUFFICIENT_STORAGE
    missing = DiskGuard(tmp_path / "nope", DiskConfig())
    assert missing.ready() == (False, missing.status().detail) and "cannot read" in missing.status().detail


def test_signature_covers_timestamp_and_body() -> None:
    signature = sign(b"k", "1700000000", b'{"a":1}')
    assert signature.startswith("sha256=") and len(signature) == 7 + 64
    assert verify(b"k", "1700000000", b'{"a":1}', signature)
    assert not verify(b"k", "1700000001", b'{"a":1}', signature)
    assert not verify(b"k", "1700000000", b'{"a":2}', signature)
    assert not verify(b"other", "1700000000", b'{"a":1}', signature)


def test_webhook_config_is_checked(tmp_path) -> None:  # type: ignore[no-untyped-def]
    secret = tmp_path / "s"
    secret.write_text("k\n")
    endpoint = {"name": "crm", "url": "https://hooks.example/x", "secret_file": str(secret)}
    loaded = config.Config.model_validate({"webhooks": {"endpoints": [endpoint]}})
    # Rejected sessions are opt-in: unauthenticated clients could otherwise flood an endpoint.
    assert loaded.webhooks.endpoints[0].events == [e for e in config.WEBHOOK_EVENTS if e != "rejected"]
    for bad, key in (({"name": "Bad Name"}, "name"), ({"url": "ftp://x"}, "url"),
                     ({"events": ["sent"]}, "events"), ({"secret_file": str(tmp_path / "none")}, "secret_file")):
        with pytest.raises(Exception, match=key):
            config.Config.model_validate({"webhooks": {"endpoints": [{**endpoint, **bad}]}})
