"""TLS-RPT pieces without the network: the rua record, the session record's counts and days, the config."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from mta import config
from mta.tlsrpt.record import ReportPolicy, SessionRecord
from mta.tlsrpt.send import parse_record


def test_rua_record_parsing() -> None:
    assert parse_record(["v=TLSRPTv1; rua=mailto:a@b.example,https://r.example/x"]) == [
        "mailto:a@b.example", "https://r.example/x"]
    assert parse_record(["v=TLSRPTv1;rua=ftp://x.example"]) is None  # no scheme RFC 8460 §3 allows
    assert parse_record(["v=spf1 -all"]) is None
    assert parse_record(["v=TLSRPTv1; rua=mailto:a@b.example"] * 2) is None  # several records: none applies


def test_sessions_counted_per_day_from_many_threads_and_after_reopening(tmp_path: Path) -> None:
    now = [1_796_083_200.0 + 3600]  # 2026-12-01 01:00 UTC
    record = SessionRecord(tmp_path / "r.db", clock=lambda: now[0])
    policy = ReportPolicy("sts", ("version: STSv1",), ("mx.a.example",))

    def count(n: int) -> None:
        for _ in range(n):
            record.session("A.example.", policy, "ok", sending_ip="192.0.2.1", mx_host="mx.a.example",
                           mx_ip="198.51.100.1")

    threads = [threading.Thread(target=count, args=(50,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    now[0] += 86400
    record.session("a.example", policy, "starttls-not-supported", sending_ip=None, mx_host="mx.a.example",
                   mx_ip=None)
    record.close()
    again = SessionRecord(tmp_path / "r.db")
    assert again.days() == ["2026-12-01", "2026-12-02"]
    [row] = again.day("2026-12-01", "a.example")
    assert row.count == 200 and row.result == "ok" and row.policy == policy
    [later] = again.day("2026-12-02", "a.example")
    assert later.result == "starttls-not-supported" and later.sending_ip == "" and later.mx_ip == ""
    again.mark_sent("2026-12-01", "a.example", "id1", ["mailto:x@y"])
    assert again.sent("2026-12-01", "a.example") == "id1" and again.sent("2026-12-02", "a.example") is None
    again.prune("2026-12-02")
    assert again.days() == ["2026-12-02"] and again.sent("2026-12-01", "a.example") is None
    again.close()


@pytest.mark.parametrize(("key", "value", "reason"), [
    ("send_at", "25:00", "is not a time of day"),
    ("sender", "nobody", "is not a mail address"),
    ("keep_days", 0, "greater than or equal to 1"),
])
def test_tls_reports_config_errors_name_the_key(tmp_path: Path, key: str, value: object, reason: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"tls_reports:\n  {key}: {value!r}\n".replace("'", '"'))
    with pytest.raises(config.ConfigError) as caught:
        config.load(path, environ={})
    assert f"tls_reports.{key}" in str(caught.value) and reason in str(caught.value), str(caught.value)


def test_the_policy_a_session_counts_under() -> None:
    from mta.delivery.dane import Tlsa
    from mta.delivery.mtasts import StsPolicy
    from mta.delivery.result import PolicyVerdict
    from mta.delivery.tlspolicy import DomainTls, HostTls, TlsPolicy

    record = Tlsa(3, 1, 1, bytes.fromhex("ab" * 32))
    plain = DomainTls("a.example", "may", "delivery.tls_level")
    dane = TlsPolicy.report_policy(plain, HostTls("dane", tlsa=(record,)), PolicyVerdict("dane"))
    assert dane == ReportPolicy("tlsa", ("3 1 1 " + "ab" * 32,))
    assert TlsPolicy.report_policy(plain, None, PolicyVerdict("dane", None, "dane-required")) == \
        ReportPolicy("no-policy-found")
    sts = DomainTls("a.example", "may", "delivery.tls_level", sts=StsPolicy("enforce", ("mx.a.example",), 600, "1", 0))
    assert TlsPolicy.report_policy(sts, None, PolicyVerdict("mta-sts", "enforce", "validation-failure")) == \
        ReportPolicy("sts", ("version: STSv1", "mode: enforce", "mx: mx.a.example", "max_age: 600"),
                     ("mx.a.example",))
    failed = DomainTls("a.example", "may", "delivery.tls_level", sts_problem="sts-policy-fetch-error")
    assert TlsPolicy.report_policy(failed, HostTls("may"), PolicyVerdict("may")) == ReportPolicy("sts")
    assert TlsPolicy.report_policy(plain, HostTls("may"), PolicyVerdict("may")) == ReportPolicy("no-policy-found")
    none = DomainTls("a.example", "none", "tls_policy rule a.example")
    assert TlsPolicy.report_policy(none, HostTls("none"), PolicyVerdict("none")) is None
