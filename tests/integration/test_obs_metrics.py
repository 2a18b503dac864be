"""Metrics as an operator scrapes them: real traffic through the real server, real /metrics."""

from __future__ import annotations

import json
import re
import smtplib
from pathlib import Path

import yaml

from tests.conftest import World
from tests.harness import HOST, send_mail
from tests.obs.scrape import scrape, wait_for_sample
from tests.peers.net import free_port

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "kustomize/components/monitoring/dashboards/kubemta.json"
RULES = ROOT / "kustomize/components/monitoring/prometheusrule.yaml"


def two_listeners(world: World) -> tuple[dict, int]:
    strict = free_port(HOST)
    config = {
        "metrics": {"domains": ["dest.test"]},
        "listeners": [
            {"name": "relay", "address": f"{HOST}:{{port}}", "trusted_networks": ["127.0.0.0/8"]},
            # nobody here may relay: every RCPT gets 554 5.7.1
            {"name": "strict", "address": f"{HOST}:{strict}", "trusted_networks": ["192.0.2.0/24"]},
        ],
    }
    return config, strict


def test_counters_move_by_the_traffic_driven_through(world: World) -> None:
    dest = world.sink("dest")
    world.sink("reject", ["-f", "RCPT"])
    sender = world.sink("sender")
    config, strict = two_listeners(world)
    server = world.mta(config)
    before = scrape(server)
    assert before.get("kubemta_delivery_outcomes_total", domain="dest.test", outcome="delivered") == 0
    assert before.get("kubemta_ready") == 1

    for i in range(3):
        send_mail(server.port, "a@sender.test", [f"user{i}@dest.test"])
    send_mail(server.port, "a@sender.test", ["nobody@reject.test"])
    with smtplib.SMTP(HOST, strict, timeout=10) as client:
        client.ehlo("app.kubemta.test")
        client.mail("a@sender.test")
        assert client.rcpt("someone@dest.test")[0] == 554
    dest.wait_for_messages(3, timeout=30)
    sender.wait_for_messages(1, timeout=30)  # the DSN for reject.test
    server.wait_queue_empty()

    after = wait_for_sample(server, "kubemta_delivery_outcomes_total", 1, domain="other", outcome="delivered")
    assert after.get("kubemta_messages_received_total", listener="relay", result="accepted") == 4
    assert after.get("kubemta_messages_received_total", listener="strict", result="accepted") == 0
    assert after.get("kubemta_rejections_total", listener="strict", reason="relay_denied") == 1
    assert after.get("kubemta_delivery_outcomes_total", domain="dest.test", outcome="delivered") == 3
    assert after.get("kubemta_delivery_outcomes_total", domain="other", outcome="bounced") == 1
    assert after.get("kubemta_delivery_outcomes_total", domain="other", outcome="delivered") == 1  # the DSN
    assert after.get("kubemta_delivery_outcomes_total", domain="dest.test", outcome="deferred") == 0
    assert after.get("kubemta_dsn_queued_total") == 1
    assert after.get("kubemta_delivery_attempts_total", domain="dest.test") == 3
    assert after.get("kubemta_delivery_attempts_total", domain="other") == 2
    assert after.get("kubemta_delivery_latency_seconds_count", domain="dest.test") == 3
    assert after.get("kubemta_delivery_attempt_duration_seconds_count", domain="dest.test") == 3
    assert after.get("kubemta_delivery_latency_seconds_bucket", domain="dest.test", le="+Inf") == 3
    # 4 received + 1 DSN stored; every one of them removed once done
    assert after.get("kubemta_spool_write_duration_seconds_count", operation="store") == 5
    assert after.get("kubemta_spool_write_duration_seconds_count", operation="remove") == 5
    assert after.get("kubemta_spool_commit_changes_total") >= 10
    assert after.get("kubemta_events_total", event="received") == 4
    for state in ("incoming", "deferred", "hold"):
        assert after.get("kubemta_queue_messages", state=state) == 0
    assert after.get("kubemta_queue_oldest_message_age_seconds") == 0
    assert after.get("kubemta_spool_disk_free_bytes") > 0
    assert after.get("kubemta_spool_disk_guard_active") == 0


def test_queue_gauges_and_sessions(world: World) -> None:
    server = world.mta({"queue": {"retry_initial": "1h", "retry_max": "1h"}})
    send_mail(server.port, "a@sender.test", ["user@down.test"])  # its MX does not answer: deferred
    result = wait_for_sample(server, "kubemta_queue_messages", 1, state="deferred")
    assert result.get("kubemta_queue_messages", state="incoming") == 0
    assert result.get("kubemta_delivery_outcomes_total", domain="other", outcome="deferred") == 1
    assert result.get("kubemta_delivery_connect_failures_total") == 1
    wait_for_sample(server, "kubemta_queue_oldest_message_age_seconds", 1.0)
    with smtplib.SMTP(HOST, server.port, timeout=10) as first, smtplib.SMTP(HOST, server.port, timeout=10) as second:
        first.ehlo("a.kubemta.test")
        second.ehlo("b.kubemta.test")
        assert scrape(server).get("kubemta_sessions_active", listener="relay") == 2
    wait_for_sample(server, "kubemta_queue_messages", 1, state="deferred")
    done = server.queue("hold", server.queue_list()[0]["id"])
    assert done.returncode == 0, done.stderr
    wait_for_sample(server, "kubemta_queue_messages", 1, state="hold")
    assert scrape(server).get("kubemta_sessions_active", listener="relay") == 0


def referenced_metrics() -> set[str]:
    exprs = []
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        exprs += [target["expr"] for target in panel.get("targets", [])]
    rule = yaml.safe_load(RULES.read_text())
    for group in rule["spec"]["groups"]:
        exprs += [item["expr"] for item in group["rules"]]
    assert exprs
    return {name for expr in exprs for name in re.findall(r"\bkubemta_[a-z_]+\b", expr)}


def test_every_metric_in_the_dashboard_and_the_alerts_exists_in_a_real_scrape(world: World) -> None:
    world.sink("dest")
    server = world.mta()
    send_mail(server.port, "a@sender.test", ["user@dest.test"])
    server.wait_queue_empty()
    result = scrape(server)
    from mta.probe import PUSHED

    # The probe's series come from mta probe through a Pushgateway (tests/integration/test_probe.py).
    names = referenced_metrics() - set(PUSHED)
    assert len(names) >= 10 and set(PUSHED) & referenced_metrics()
    missing = sorted(name for name in names if not result.has(name))
    assert missing == [], f"not in /metrics: {missing}"


def test_metrics_can_be_switched_off(world: World) -> None:
    server = world.mta({"metrics": {"enabled": False}})
    try:
        scrape(server)
    except OSError as exc:
        assert getattr(exc, "code", None) == 404
    else:
        raise AssertionError("/metrics answered although metrics are off")


def test_counters_with_known_labels_exist_at_zero_before_the_first_event(world: World) -> None:
    """rate() and the alerts see a 0, not nothing: rejection reasons and each webhook endpoint's counters."""
    from mta.obs.metrics import REJECTION_REASONS, WEBHOOK_DROP_REASONS

    secret = world.root / "webhook.secret"
    secret.write_text("s" * 32 + "\n")
    secret.chmod(0o600)
    server = world.mta({"webhooks": {"endpoints": [
        {"name": "crm", "url": f"http://{HOST}:{free_port(HOST)}/events", "secret_file": str(secret)}]}})
    result = scrape(server)
    assert "relay_denied" in REJECTION_REASONS and len(REJECTION_REASONS) >= 10
    for reason in REJECTION_REASONS:
        key = ("kubemta_rejections_total", frozenset({"listener": "relay", "reason": reason}.items()))
        assert result.samples.get(key) == 0, reason
    for name in ("kubemta_webhook_deliveries_total", "kubemta_webhook_failures_total",
                 "kubemta_webhook_outbox_events"):
        assert result.samples.get((name, frozenset({"endpoint": "crm"}.items()))) == 0, name
    for reason in WEBHOOK_DROP_REASONS:
        key = ("kubemta_webhook_dropped_total", frozenset({"endpoint": "crm", "reason": reason}.items()))
        assert result.samples.get(key) == 0, reason


def test_every_webhook_drop_reason_in_the_code_is_known_from_the_start() -> None:
    from mta.obs.metrics import WEBHOOK_DROP_REASONS

    source = (ROOT / "mta/obs/webhooks.py").read_text()
    used = set(re.findall(r'_dropped\(endpoint, "(\w+)"\)', source)) | set(re.findall(r'_drop_all\("(\w+)"\)', source))
    assert used and used <= set(WEBHOOK_DROP_REASONS), used - set(WEBHOOK_DROP_REASONS)
