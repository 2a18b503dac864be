"""TLS-RPT (RFC 8460) against real peers: sessions counted, reports built, mailed and posted.

A real DNS server (unbound) publishes MX, A, ``_mta-sts`` and
``_smtp._tls`` records; the tests' HTTPS server (aiohttp, trustme CA)
serves the MTA-STS policy and takes the ``https`` rua POSTs; aiosmtpd
receivers stand for the recipient's MX (one with STARTTLS, one stripped)
and for the report mailbox.  ``mta serve`` counts the sessions, ``mta tls
report --send`` sends the day's reports, and the JSON is checked against
RFC 8460 §4.4's schema written out below as a JSON Schema.
"""

from __future__ import annotations

import datetime
import email
import email.policy
import gzip
import json
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import trustme

from tests.harness import MtaServer, send_mail
from tests.peers.dns import DnsServer
from tests.peers.recorder import Recorder
from tests.peers.stsweb import StsWebServer

ZONE = "rpt.test"

# RFC 8460 §4.4, as a JSON Schema: the fields the RFC requires, their types, and the result types of §4.3.
RESULT_TYPES = ["starttls-not-supported", "certificate-host-mismatch", "certificate-expired",
                "certificate-not-trusted", "validation-failure", "tlsa-invalid", "dnssec-invalid",
                "dane-required", "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid"]
COUNT = {"type": "integer", "minimum": 0}
SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["organization-name", "date-range", "contact-info", "report-id", "policies"],
    "properties": {
        "organization-name": {"type": "string", "minLength": 1},
        "date-range": {"type": "object", "required": ["start-datetime", "end-datetime"], "properties": {
            "start-datetime": {"type": "string", "format": "date-time"},
            "end-datetime": {"type": "string", "format": "date-time"}}},
        "contact-info": {"type": "string", "minLength": 1},
        "report-id": {"type": "string", "minLength": 1},
        "policies": {"type": "array", "items": {
            "type": "object", "required": ["policy", "summary"], "properties": {
                "policy": {"type": "object", "required": ["policy-type", "policy-domain"], "properties": {
                    "policy-type": {"enum": ["tlsa", "sts", "no-policy-found"]},
                    "policy-string": {"type": "array", "items": {"type": "string"}},
                    "policy-domain": {"type": "string", "minLength": 1},
                    "mx-host": {"type": "array", "items": {"type": "string"}}}},
                "summary": {"type": "object",
                            "required": ["total-successful-session-count", "total-failure-session-count"],
                            "properties": {"total-successful-session-count": COUNT,
                                           "total-failure-session-count": COUNT}},
                "failure-details": {"type": "array", "items": {
                    "type": "object", "required": ["result-type", "failed-session-count"], "properties": {
                        "result-type": {"enum": RESULT_TYPES},
                        "sending-mta-ip": {"type": "string", "format": "ipv4"},
                        "receiving-mx-hostname": {"type": "string"},
                        "receiving-mx-helo": {"type": "string"},
                        "receiving-ip": {"type": "string", "format": "ipv4"},
                        "failed-session-count": COUNT,
                        "additional-information": {"type": "string"},
                        "failure-reason-code": {"type": "string"}}}}}}},
    },
}


def validate(report: dict[str, Any]) -> None:
    jsonschema.validate(report, SCHEMA, format_checker=jsonschema.FormatChecker())


@dataclass
class World:
    dns: DnsServer
    web: StsWebServer
    roots: Path
    mx_tls: ssl.SSLContext


def server_context(cert: trustme.LeafCert) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    return context


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("tlsrpt")
    ca = trustme.CA()
    roots = root / "ca.pem"
    ca.cert_pem.write_to_path(str(roots))
    web = StsWebServer(server_context(ca.issue_cert(f"mta-sts.sts.{ZONE}", f"reports.{ZONE}")), {
        f"mta-sts.sts.{ZONE}": "version: STSv1\nmode: testing\nmx: mx.sts.rpt.test\nmax_age: 86400\n"})
    records = [f"reports.{ZONE}. IN A 127.0.0.1", f"mailbox.{ZONE}. IN MX 10 mx.mailbox.{ZONE}.",
               f"mx.mailbox.{ZONE}. IN A 127.0.0.1"]
    for name in ("sts", "silent"):
        domain = f"{name}.{ZONE}"
        records += [f"{domain}. IN MX 10 mx.{domain}.", f"mx.{domain}. IN A 127.0.0.1"]
    records += [f'_mta-sts.sts.{ZONE}. IN TXT "v=STSv1; id=1"', f"mta-sts.sts.{ZONE}. IN A 127.0.0.1",
                f'_smtp._tls.sts.{ZONE}. IN TXT "v=TLSRPTv1; rua=mailto:tls@mailbox.{ZONE},'
                f'https://reports.{ZONE}:{web.port}/tlsrpt"']
    dns_server = DnsServer(records, [ZONE], root / "dns")
    dns_server.start()
    web.start()
    try:
        yield World(dns_server, web, roots,
                    server_context(ca.issue_cert(f"mx.sts.{ZONE}", f"mx.silent.{ZONE}", f"mx.mailbox.{ZONE}")))
    finally:
        web.stop()
        dns_server.stop()


def mta(world: World, workdir: Path, port: int, **more: object) -> MtaServer:
    return MtaServer(workdir, more | {
        "dns": {"nameservers": [world.dns.address]},
        "delivery": {"port": port, "tls_ca_file": str(world.roots), "mta_sts_port": world.web.port,
                     "allowed_networks": ["127.0.0.0/8"], "remember_starttls": 0},
        "queue": {"retry_initial": "1h", "retry_max": "1h"},
        "tls_reports": {"organization_name": "Sender Org", "contact_info": "tls@sender.test"},
    })


def test_reports_counted_across_a_restart_then_mailed_and_posted(world: World, tmp_path: Path) -> None:
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    with Recorder(tls=world.mx_tls) as receiver:
        server = mta(world, tmp_path / "mta", receiver.port)
        server.start()
        try:
            send_mail(server.port, "app@sender.test", [f"user@sts.{ZONE}"])
            send_mail(server.port, "app@sender.test", [f"user@silent.{ZONE}"])
            receiver.wait_for(2)
        finally:
            server.stop()
    with Recorder(hide={"STARTTLS"}) as stripped:
        # Behind an egress gateway the receiver sees identity.egress_address, not the socket's own.
        server = mta(world, tmp_path / "mta", stripped.port, identity={"egress_address": "192.0.2.25"})
        server.start()  # the same spool volume: the counts of the first run are still there
        try:
            queue_id = send_mail(server.port, "app@sender.test", [f"user@sts.{ZONE}"])
            stripped.wait_for(1)  # mode testing: delivered in plain text, and reported
            log = server.wait_for_log('"event":"delivered"')
            shown = server.cli("tls", "report", "--date", today)
            assert shown.returncode == 0, shown.stderr
            reports = {item["policies"][0]["policy"]["policy-domain"]: item for item in json.loads(shown.stdout)}
            assert set(reports) == {f"sts.{ZONE}", f"silent.{ZONE}"}, reports
            sent = server.cli("tls", "report", "--send", "--date", today)
            assert sent.returncode == 0, sent.stderr
            assert f"silent.{ZONE}: no TLSRPT record" in sent.stdout, sent.stdout
            assert f"sts.{ZONE}: mailto:tls@mailbox.{ZONE}: sent; https://reports.{ZONE}" in sent.stdout
            again = server.cli("tls", "report", "--send", "--date", today)
            assert f"sts.{ZONE}: sent before" in again.stdout, again.stdout
        finally:
            server.stop()
    # The delivered event names the policy that applied, its mode and how the session went.
    line = next(item for item in log.splitlines() if '"event":"delivered"' in item and queue_id in item)
    assert '"tls_policy":"mta-sts"' in line and '"tls_policy_mode":"testing"' in line, line
    assert '"tls_policy_result":"starttls-not-supported"' in line, line
    # The https rua: one POST, gzip, application/tlsrpt+gzip.
    [(content_type, body)] = world.web.posts
    assert content_type == "application/tlsrpt+gzip"
    posted = json.loads(gzip.decompress(body))
    validate(posted)
    [policy] = posted["policies"]
    assert policy["policy"] == {"policy-type": "sts", "policy-domain": f"sts.{ZONE}", "mx-host": [f"mx.sts.{ZONE}"],
                                "policy-string": ["version: STSv1", "mode: testing", f"mx: mx.sts.{ZONE}",
                                                  "max_age: 86400"]}
    assert policy["summary"] == {"total-successful-session-count": 1, "total-failure-session-count": 1}
    [failure] = policy["failure-details"]
    assert failure == {"result-type": "starttls-not-supported", "sending-mta-ip": "192.0.2.25",
                       "receiving-mx-hostname": f"mx.sts.{ZONE}", "receiving-ip": "127.0.0.1",
                       "failed-session-count": 1}
    assert posted["organization-name"] == "Sender Org" and posted["contact-info"] == "tls@sender.test"
    assert posted["date-range"] == {"start-datetime": f"{today}T00:00:00Z", "end-datetime": f"{today}T23:59:59Z"}


def test_mailed_report_reaches_a_real_receiver(world: World, tmp_path: Path) -> None:
    """The mailto rua goes through the queue to the mailbox's MX: multipart/report, RFC 8460 §5.3 headers."""
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    with Recorder(tls=world.mx_tls) as receiver:
        server = mta(world, tmp_path / "mta", receiver.port)
        server.start()
        try:
            send_mail(server.port, "app@sender.test", [f"user@sts.{ZONE}"])
            receiver.wait_for(1)
            sent = server.cli("tls", "report", "--send", "--date", today)
            assert sent.returncode == 0 and "mailto" in sent.stdout, (sent.stdout, sent.stderr)
            received = receiver.wait_for(2)
        finally:
            server.stop()
    [mail] = [item for item in received if f"tls@mailbox.{ZONE}" in item.rcpt_tos]
    message = email.message_from_bytes(mail.data, policy=email.policy.default)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "tlsrpt"
    assert message["TLS-Report-Domain"] == f"sts.{ZONE}"
    assert message["TLS-Report-Submitter"] == server.config["hostname"]
    assert message["Subject"].startswith(f"Report Domain: sts.{ZONE} Submitter: {server.config['hostname']} "
                                         "Report-ID: <")
    [part] = [p for p in message.iter_attachments() if p.get_content_type() == "application/tlsrpt+gzip"]
    assert part.get_filename().endswith(".json.gz") and f"!sts.{ZONE}!" in part.get_filename()
    report = json.loads(gzip.decompress(part.get_content()))
    validate(report)
    assert report["policies"][0]["summary"]["total-successful-session-count"] == 1
    assert report["report-id"] in message["Subject"]


def test_doctor_says_whether_https_is_reachable(tmp_path: Path) -> None:
    """mta doctor's https check against a real HTTPS server, and against a port where nothing listens."""
    import asyncio

    from mta import config
    from mta.identity.checks import SelfChecks
    from tests.peers.net import free_port

    ca = trustme.CA()
    roots = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(roots))

    def check(probe: str) -> Any:
        path = tmp_path / "c.yaml"
        path.write_text(f"identity:\n  https_probe: '{probe}'\ndelivery:\n  tls_ca_file: '{roots}'\n")
        return asyncio.run(SelfChecks(config.load(path, environ={}), []).https())

    with StsWebServer(server_context(ca.issue_cert("localhost"))) as web:
        reached = check(f"localhost:{web.port}")
    assert reached.status == "pass" and f"https://localhost:{web.port} reachable" in reached.reason, reached
    closed = check(f"localhost:{free_port()}")
    assert closed.status == "warn" and "MTA-STS policies cannot be fetched" in closed.reason, closed
    with StsWebServer(server_context(trustme.CA().issue_cert("localhost"))) as stranger:
        untrusted = check(f"localhost:{stranger.port}")
    assert untrusted.status == "warn" and "CERTIFICATE_VERIFY_FAILED" in untrusted.reason, untrusted
