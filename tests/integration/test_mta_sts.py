"""Outbound TLS policy against real peers: MTA-STS, configured levels, STARTTLS seen before.

The courier with its real connector delivers to aiosmtpd receivers on
loopback — STARTTLS with a certificate from a trustme CA for the MX name,
one for another name, one offering no STARTTLS — finding them through a
real DNS server (unbound) that publishes MX, A and ``_mta-sts`` TXT
records.  Policies come from the tests' own HTTPS server (aiohttp, trustme
certificate), fetched with certificate checks against that CA.  Each case
checks what arrived (or that nothing did) and the verdict the events get.
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from mta.config import TlsPolicyRule
from mta.delivery.client import ClientSettings, Connector
from mta.delivery.courier import Courier, Parcel, Report
from mta.delivery.mtasts import MtaSts
from mta.delivery.mx import MxResolver, make_resolver, may_connect
from mta.delivery.result import Kind, Outcome
from mta.delivery.route import NextHop
from mta.delivery.seen import StartTlsSeen
from mta.delivery.tlspolicy import TlsPolicy
from tests.peers.dns import DnsServer
from tests.peers.recorder import Recorder
from tests.peers.stsweb import StsWebServer

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)
ZONE = "sts.test"
DOMAINS = ("enforce", "other", "testing", "plain", "cached", "redirect", "huge", "html")
MESSAGE = b"From: <app@sender.test>\r\nTo: <user@dest.test>\r\nSubject: policy\r\n\r\nhello\r\n"


def policy_text(mode: str, *mx: str, max_age: int = 86400) -> str:
    return "version: STSv1\n" + f"mode: {mode}\n" + "".join(f"mx: {item}\n" for item in mx) + f"max_age: {max_age}\n"


@dataclass
class World:
    ca: trustme.CA
    dns: DnsServer
    web: StsWebServer
    good_tls: ssl.SSLContext  # a certificate for every mx.<domain>.sts.test
    wrong_tls: ssl.SSLContext  # from the same CA, for another name
    roots: Path

    def sts(self, cache: Path) -> MtaSts:
        roots = ssl.create_default_context(cafile=str(self.roots))
        return MtaSts(make_resolver([(self.dns.host, self.dns.port)], 2.0), cache, roots, port=self.web.port,
                      allowed=lambda address: may_connect(address, LOOPBACK), timeout=5)


def server_context(cert: trustme.LeafCert) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    return context


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("mta-sts")
    ca = trustme.CA()
    roots = root / "ca.pem"
    ca.cert_pem.write_to_path(str(roots))
    records = []
    for name in DOMAINS:
        domain = f"{name}.{ZONE}"
        records += [f"{domain}. IN MX 10 mx.{domain}.", f"mx.{domain}. IN A 127.0.0.1"]
        if name != "plain":
            records += [f'_mta-sts.{domain}. IN TXT "v=STSv1; id=20261202"', f"mta-sts.{domain}. IN A 127.0.0.1"]
    web_cert = ca.issue_cert(*(f"mta-sts.{name}.{ZONE}" for name in DOMAINS))
    web = StsWebServer(server_context(web_cert), {
        f"mta-sts.enforce.{ZONE}": policy_text("enforce", f"mx.enforce.{ZONE}"),
        f"mta-sts.other.{ZONE}": policy_text("enforce", f"mx.elsewhere.{ZONE}"),
        f"mta-sts.testing.{ZONE}": policy_text("testing", f"*.testing.{ZONE}"),
        f"mta-sts.cached.{ZONE}": policy_text("enforce", f"mx.cached.{ZONE}"),
        f"mta-sts.huge.{ZONE}": policy_text("enforce", *(f"mx{n}.huge.{ZONE}" for n in range(3000))),
        f"mta-sts.redirect.{ZONE}": policy_text("enforce", f"mx.redirect.{ZONE}"),
    })
    web.redirect.add(f"mta-sts.redirect.{ZONE}")
    dns_server = DnsServer(records, [ZONE], root / "dns")
    dns_server.start()
    web.start()
    try:
        yield World(ca, dns_server, web, server_context(ca.issue_cert(*(f"mx.{n}.{ZONE}" for n in DOMAINS))),
                    server_context(ca.issue_cert("impostor.example")), roots)
    finally:
        web.stop()
        dns_server.stop()


def deliver(world: World, policy: TlsPolicy, port: int, domain: str) -> Report:
    settings = ClientSettings(helo_name="mta.sender.test", port=port, connect_timeout=5, command_timeout=15,
                              allowed_networks=LOOPBACK)
    connector = Connector(settings, MxResolver(make_resolver([(world.dns.host, world.dns.port)], 2.0)), policy,
                          world.roots)

    async def content(queue_id: str) -> bytes:
        return MESSAGE

    async def main() -> Report:
        courier = Courier(connector.open, content)
        try:
            return await courier.deliver(NextHop("mx", domain), Parcel("Q1", "app@sender.test", [f"user@{domain}"],
                                                                        len(MESSAGE)), per_connection=10)
        finally:
            await courier.close()

    return asyncio.run(asyncio.wait_for(main(), 60))


def single(report: Report) -> Outcome:
    [outcome] = report.outcomes.values()
    return outcome


def sts_policy(world: World, tmp_path: Path, **kwargs: object) -> TlsPolicy:
    return TlsPolicy([], "may", sts=world.sts(tmp_path / "cache"), **kwargs)  # type: ignore[arg-type]


def test_enforce_delivers_to_a_matching_mx_with_a_verified_certificate(world: World, tmp_path: Path) -> None:
    with Recorder(tls=world.good_tls) as receiver:
        outcome = single(deliver(world, sts_policy(world, tmp_path), receiver.port, f"enforce.{ZONE}"))
        [received] = receiver.wait_for(1)
    assert outcome.kind is Kind.DELIVERED, outcome
    assert received.tls
    assert outcome.policy is not None and outcome.policy.fields() == {
        "tls_policy": "mta-sts", "tls_policy_mode": "enforce", "tls_policy_result": "ok"}
    assert (tmp_path / "cache" / f"enforce.{ZONE}.json").exists(), "the policy is cached on the volume"


def test_enforce_refuses_an_mx_the_policy_does_not_name(world: World, tmp_path: Path) -> None:
    with Recorder(tls=world.good_tls) as receiver:
        outcome = single(deliver(world, sts_policy(world, tmp_path), receiver.port, f"other.{ZONE}"))
        assert receiver.messages == [] and receiver.sessions == [], "no session with a host the policy excludes"
    assert outcome.kind is Kind.TRANSIENT and outcome.reply.enhanced == "4.7.5", outcome
    assert outcome.policy is not None and outcome.policy.result == "validation-failure"


def test_enforce_refuses_a_certificate_for_another_name(world: World, tmp_path: Path) -> None:
    with Recorder(tls=world.wrong_tls) as receiver:
        outcome = single(deliver(world, sts_policy(world, tmp_path), receiver.port, f"enforce.{ZONE}"))
        assert receiver.messages == []
    assert outcome.kind is Kind.TRANSIENT and outcome.reply.enhanced == "4.7.5", outcome
    assert outcome.policy is not None and outcome.policy.result == "certificate-host-mismatch", outcome.policy


def test_enforce_defers_when_starttls_is_stripped(world: World, tmp_path: Path) -> None:
    with Recorder(tls=world.good_tls, hide={"STARTTLS"}) as receiver:
        outcome = single(deliver(world, sts_policy(world, tmp_path), receiver.port, f"enforce.{ZONE}"))
        assert receiver.messages == [], "never in plain text"
    assert outcome.kind is Kind.TRANSIENT and outcome.reply.enhanced.startswith("4.7."), outcome
    assert outcome.policy is not None and outcome.policy.result == "starttls-not-supported"


def test_testing_delivers_without_starttls_and_reports(world: World, tmp_path: Path) -> None:
    with Recorder(hide={"STARTTLS"}) as receiver:
        outcome = single(deliver(world, sts_policy(world, tmp_path), receiver.port, f"testing.{ZONE}"))
        [received] = receiver.wait_for(1)
    assert outcome.kind is Kind.DELIVERED and not received.tls
    assert outcome.policy is not None and outcome.policy.fields() == {
        "tls_policy": "mta-sts", "tls_policy_mode": "testing", "tls_policy_result": "starttls-not-supported"}


def test_testing_delivers_past_a_wrong_certificate_over_tls(world: World, tmp_path: Path) -> None:
    with Recorder(tls=world.wrong_tls) as receiver:
        outcome = single(deliver(world, sts_policy(world, tmp_path), receiver.port, f"testing.{ZONE}"))
        [received] = receiver.wait_for(1)
    assert outcome.kind is Kind.DELIVERED and received.tls, "reported, then sent over unverified TLS"
    assert outcome.policy is not None and outcome.policy.result == "certificate-host-mismatch"


def test_a_domain_seen_with_starttls_is_not_downgraded(world: World, tmp_path: Path) -> None:
    domain = f"plain.{ZONE}"
    store = tmp_path / "seen.json"
    policy = TlsPolicy([], "may", seen=StartTlsSeen(store, 30 * 86400, write_interval=0))
    with Recorder(tls=world.good_tls) as receiver:
        assert single(deliver(world, policy, receiver.port, domain)).kind is Kind.DELIVERED
    assert domain in store.read_text()
    # Another process later (a restart): the memory is on disk.
    later = TlsPolicy([], "may", seen=StartTlsSeen(store, 30 * 86400))
    with Recorder(hide={"STARTTLS"}) as stripped:
        outcome = single(deliver(world, later, stripped.port, domain))
        assert stripped.messages == []
    assert outcome.kind is Kind.TRANSIENT and outcome.reply.enhanced == "4.7.4", outcome
    assert "offered STARTTLS before" in outcome.reply.text
    # Without the memory, the same receiver gets the mail in plain text (level may, as before).
    with Recorder(hide={"STARTTLS"}) as stripped:
        assert single(deliver(world, TlsPolicy([], "may"), stripped.port, domain)).kind is Kind.DELIVERED


def test_configured_levels_encrypt_and_verify(world: World, tmp_path: Path) -> None:
    domain = f"plain.{ZONE}"
    encrypt = TlsPolicy([TlsPolicyRule(match=[f"*.{ZONE}"], level="encrypt")], "may")
    verify = TlsPolicy([TlsPolicyRule(match=[domain], level="verify")], "may")
    with Recorder(hide={"STARTTLS"}) as stripped:
        outcome = single(deliver(world, encrypt, stripped.port, domain))
        assert stripped.messages == []
    assert outcome.kind is Kind.TRANSIENT and outcome.policy is not None and outcome.policy.policy == "encrypt"
    with Recorder(tls=world.wrong_tls) as wrong:
        assert single(deliver(world, encrypt, wrong.port, domain)).kind is Kind.DELIVERED, "encrypt: any cert"
        outcome = single(deliver(world, verify, wrong.port, domain))
    assert outcome.kind is Kind.TRANSIENT and outcome.policy is not None and outcome.policy.fields() == {
        "tls_policy": "verify", "tls_policy_result": "certificate-host-mismatch"}
    with Recorder(tls=world.good_tls) as good:
        assert single(deliver(world, verify, good.port, domain)).kind is Kind.DELIVERED


def test_policy_cached_across_a_restart_while_https_is_down(world: World, tmp_path: Path) -> None:
    domain = f"cached.{ZONE}"
    with Recorder(tls=world.good_tls) as receiver:
        assert single(deliver(world, sts_policy(world, tmp_path), receiver.port, domain)).kind is Kind.DELIVERED
    host = f"mta-sts.{domain}"
    assert world.web.requests.count(host) == 1
    saved = world.web.policies.pop(host)
    try:
        # A new process (empty memory, same cache directory); the policy server now fails.
        async def lookup() -> object:
            return await world.sts(tmp_path / "cache").lookup(domain)
        found = asyncio.run(lookup())
        assert found.policy is not None and found.policy.mode == "enforce", found  # type: ignore[attr-defined]
        with Recorder(hide={"STARTTLS"}) as stripped:
            outcome = single(deliver(world, sts_policy(world, tmp_path), stripped.port, domain))
            assert stripped.messages == []
        assert outcome.kind is Kind.TRANSIENT and outcome.policy is not None and outcome.policy.policy == "mta-sts"
        assert world.web.requests.count(host) == 1, "the same id: the cached policy is used, nothing fetched"
    finally:
        world.web.policies[host] = saved


def test_mta_serve_events_name_the_policy_and_its_result(world: World, tmp_path: Path) -> None:
    """The real server: an enforced policy defers a stripped receiver; events, metrics and mta tls check say why."""
    import json
    import urllib.request

    from tests.harness import MtaServer, send_mail

    with Recorder(hide={"STARTTLS"}) as stripped:
        server = MtaServer(tmp_path / "mta", {
            "dns": {"nameservers": [world.dns.address]},
            "delivery": {"port": stripped.port, "tls_ca_file": str(world.roots), "mta_sts_port": world.web.port},
            "queue": {"retry_initial": "1h", "retry_max": "1h"},
        })
        server.start()
        try:
            queue_id = send_mail(server.port, "app@sender.test", [f"user@enforce.{ZONE}"])
            log = server.wait_for_log('"event":"deferred"')
            assert stripped.messages == []
            with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/metrics", timeout=10) as response:
                metrics = response.read().decode()
            assert 'kubemta_delivery_tls_policy_total{outcome="deferred",policy="mta-sts",' \
                   'result="starttls-not-supported"} 1.0' in metrics, metrics
            check = server.cli("tls", "check", f"enforce.{ZONE}", "--json")
            assert check.returncode == 0, check.stderr
            report = json.loads(check.stdout)
            assert report["mta_sts"]["mode"] == "enforce" and report["mta_sts"]["mx"] == [f"mx.enforce.{ZONE}"]
            [host] = report["hosts"]
            assert host["host"] == f"mx.enforce.{ZONE}" and host["used"] and host["tls_required"], host
            assert host["verify_certificate"] and host["tls_policy"] == "mta-sts", host
            check = server.cli("tls", "check", f"other.{ZONE}")
            assert check.returncode == 0, check.stderr
            assert f"mx mx.other.{ZONE} (preference 10, insecure): not used: 454 4.7.5" in check.stdout, check.stdout
            assert "MTA-STS: mode enforce" in check.stdout
        finally:
            server.stop()
    line = next(item for item in log.splitlines() if '"event":"deferred"' in item and queue_id in item)
    assert '"tls_policy":"mta-sts"' in line and '"tls_policy_mode":"enforce"' in line, line
    assert '"tls_policy_result":"starttls-not-supported"' in line and '"enhanced":"4.7.4"' in line, line
    assert (Path(server.config["spool"]["path"]) / "tls" / "mta-sts" / f"enforce.{ZONE}.json").exists()


def test_concurrent_deliveries_fetch_a_policy_once(world: World, tmp_path: Path) -> None:
    host = f"mta-sts.enforce.{ZONE}"
    before = world.web.requests.count(host)
    sts = world.sts(tmp_path / "cache")

    async def main() -> list[object]:
        return await asyncio.gather(*(sts.lookup(f"enforce.{ZONE}") for _ in range(50)))

    results = asyncio.run(asyncio.wait_for(main(), 30))
    assert all(item.policy is not None and item.policy.mode == "enforce" for item in results)  # type: ignore[attr-defined]
    assert world.web.requests.count(host) - before == 1, "one fetch for fifty deliveries"


@pytest.mark.parametrize(("name", "problem"), [("redirect", "sts-policy-fetch-error"),
                                               ("huge", "sts-policy-invalid"),
                                               ("html", "sts-policy-fetch-error")])
def test_a_policy_fetch_is_bounded_and_follows_no_redirect(world: World, tmp_path: Path, name: str,
                                                           problem: str) -> None:
    """A redirect, a body over 64 KiB and a missing policy (404) all leave the domain without a policy."""
    async def main() -> object:
        return await world.sts(tmp_path / "cache").lookup(f"{name}.{ZONE}")

    found = asyncio.run(main())
    assert found.policy is None and found.problem == problem, found  # type: ignore[attr-defined]
    assert not (tmp_path / "cache" / f"{name}.{ZONE}.json").exists()
    with Recorder(hide={"STARTTLS"}) as plain:
        outcome = single(deliver(world, sts_policy(world, tmp_path), plain.port, f"{name}.{ZONE}"))
        assert outcome.kind is Kind.DELIVERED, "no policy: delivered as before"
