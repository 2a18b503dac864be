"""The monitoring component's alert rules and dashboard, checked by real promtool."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPONENT = ROOT / "kustomize/components/monitoring"
RULES = COMPONENT / "prometheusrule.yaml"
DASHBOARD = COMPONENT / "dashboards/kubemta.json"
RULE_TESTS = ROOT / "tests/obs/rules_test.yaml"


@pytest.fixture
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not on PATH: apt-get install prometheus (see .ci/run)", pytrace=False)
    return path


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    """The PrometheusRule's spec as a plain Prometheus rules file, beside the unit tests."""
    rule = yaml.safe_load(RULES.read_text())
    assert rule["kind"] == "PrometheusRule" and rule["apiVersion"] == "monitoring.coreos.com/v1"
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    shutil.copy(RULE_TESTS, tmp_path / "rules_test.yaml")
    return tmp_path


def test_alert_rules_pass_promtool_check(promtool: str, rules_dir: Path) -> None:
    done = subprocess.run([promtool, "check", "rules", str(rules_dir / "rules.yaml")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_alert_rules_pass_their_unit_tests(promtool: str, rules_dir: Path) -> None:
    done = subprocess.run([promtool, "test", "rules", "rules_test.yaml"], cwd=rules_dir, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_alerts_the_issue_asks_for_exist() -> None:
    rule = yaml.safe_load(RULES.read_text())
    names = {item["alert"] for group in rule["spec"]["groups"] for item in group["rules"]}
    assert {"KubemtaQueueGrowing", "KubemtaOldestMessageTooOld", "KubemtaBounceRateHigh", "KubemtaNoDeliveries",
            "KubemtaSelfCheckFailing", "KubemtaSpoolDiskFilling", "KubemtaNotReady",
            "KubemtaHardBounceRateHigh", "KubemtaComplaintRateHigh"} <= names


def test_dashboard_is_grafana_json_with_the_promised_panels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "kubemta"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    for metric in ("kubemta_messages_received_total", "kubemta_queue_messages",
                   "kubemta_queue_oldest_message_age_seconds", "kubemta_delivery_outcomes_total",
                   "kubemta_bounces_total", "kubemta_suppressions_added_total",
                   "kubemta_delivery_latency_seconds_bucket", "kubemta_selfcheck_ok", "kubemta_spool_disk_free_bytes",
                   "kubemta_sending_domain_bounces_total", "kubemta_sending_domain_sent_total",
                   "kubemta_complaints_total", "kubemta_esp_events_total", "kubemta_feedback_reports_total"):
        assert metric in exprs, metric
    for p in panels:
        assert p["targets"] and p["datasource"]["uid"] == "${datasource}", p["title"]


def test_every_alert_has_a_runbook_section() -> None:
    rule = yaml.safe_load(RULES.read_text())
    runbooks = (ROOT / "docs/runbooks.md").read_text()
    sections = {line[3:].strip() for line in runbooks.splitlines() if line.startswith("## ")}
    alerts = [item for group in rule["spec"]["groups"] for item in group["rules"]]
    assert sections == {item["alert"] for item in alerts}
    for item in alerts:
        url = item["annotations"]["runbook_url"]
        assert url.endswith(f"docs/runbooks.md#{item['alert'].lower()}"), url


def test_dashboard_units_fit_what_each_query_returns() -> None:
    """A ratio of two rates is a number, not seconds: a target with one gets a unit override."""
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in (p for p in dashboard["panels"] if p["type"] == "timeseries"):
        default = panel["fieldConfig"]["defaults"].get("unit")
        overrides = {o["matcher"]["options"]: {p["id"]: p["value"] for p in o["properties"]}
                     for o in panel["fieldConfig"]["overrides"] if o["matcher"]["id"] == "byFrameRefID"}
        for target in panel["targets"]:
            unit = overrides.get(target["refId"], {}).get("unit", default)
            ratio = "/ sum(rate(" in target["expr"]
            seconds = "_seconds" in target["expr"] and not ratio
            if ratio:
                assert unit in ("percentunit", "none", "short"), (panel["title"], target["refId"], unit)
            if seconds:
                assert unit == "s", (panel["title"], target["refId"], unit)
