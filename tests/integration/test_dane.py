"""DANE (RFC 7672) against real peers: Knot signs the zone, a validating unbound sets the AD bit.

Knot serves ``dane.test`` signed with its automatic DNSSEC signing and
``plain.test`` unsigned; unbound validates with ``dane.test``'s key as its
only trust anchor, so only answers from ``dane.test`` are secure.  TLSA
records name the aiosmtpd receivers' certificates (trustme: a root, an
intermediate that issues the MX certificates).  Each case checks whether
the message arrived and the verdict its outcome carries.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from mta.config import TlsPolicyRule
from mta.delivery.client import ClientSettings, Connector
from mta.delivery.courier import Courier, Parcel
from mta.delivery.mtasts import MtaSts
from mta.delivery.mx import MxResolver, make_resolver, may_connect
from mta.delivery.result import Kind, Outcome
from mta.delivery.route import NextHop
from mta.delivery.tlspolicy import TlsPolicy
from tests.e2e.authdns import KnotServer
from tests.peers.net import free_port
from tests.peers.recorder import Recorder
from tests.peers.stsweb import StsWebServer
from tests.peers.validator import ValidatingResolver

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)
MESSAGE = b"From: <app@sender.test>\r\nTo: <user@dest.test>\r\nSubject: dane\r\n\r\nhello\r\n"
MX_NAMES = [f"mx.{name}.dane.test" for name in ("ee", "full", "ta", "bad", "notlsa", "both")] + ["mx.plain.test"]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leaf_hashes(cert: trustme.LeafCert) -> tuple[str, str]:
    """(SHA-256 of the SPKI, SHA-256 of the certificate) of the leaf."""
    leaf = x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes())
    spki = leaf.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return sha256(spki), sha256(leaf.public_bytes(Encoding.DER))


def server_context(cert: trustme.LeafCert) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)  # sends the leaf and the intermediate
    return context


@dataclass
class World:
    port: int  # every receiver's port (the TLSA names say _<port>._tcp)
    resolver: ValidatingResolver
    good: ssl.SSLContext  # leaf for all MX names from the intermediate
    wrong_name: ssl.SSLContext  # from the intermediate, for another name
    stranger: ssl.SSLContext  # the right names, from a CA no record names
    web: StsWebServer
    roots: Path

    def policy(self, tmp_path: Path, rules: list[TlsPolicyRule] | None = None) -> TlsPolicy:
        resolver = make_resolver([(self.resolver.host, self.resolver.port)], 2.0)
        sts = MtaSts(resolver, tmp_path / "sts", ssl.create_default_context(cafile=str(self.roots)),
                     port=self.web.port, allowed=lambda address: may_connect(address, LOOPBACK), timeout=5)
        return TlsPolicy(rules or [], "may", sts=sts, dane_resolver=resolver, port=self.port)

    def deliver(self, policy: TlsPolicy, domain: str) -> Outcome:
        settings = ClientSettings(helo_name="mta.sender.test", port=self.port, connect_timeout=5,
                                  command_timeout=15, allowed_networks=LOOPBACK)
        resolver = make_resolver([(self.resolver.host, self.resolver.port)], 2.0)
        connector = Connector(settings, MxResolver(resolver), policy, self.roots)

        async def content(queue_id: str) -> bytes:
            return MESSAGE

        async def main() -> Outcome:
            courier = Courier(connector.open, content)
            try:
                report = await courier.deliver(NextHop("mx", domain), Parcel(
                    "Q1", "app@sender.test", [f"user@{domain}"], len(MESSAGE)), per_connection=10)
            finally:
                await courier.close()
            [outcome] = report.outcomes.values()
            return outcome

        return asyncio.run(asyncio.wait_for(main(), 60))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("dane")
    ca = trustme.CA()
    intermediate = ca.create_child_ca()
    roots = root / "ca.pem"
    ca.cert_pem.write_to_path(str(roots))
    good = intermediate.issue_cert(*MX_NAMES)
    spki, whole = leaf_hashes(good)
    ta = sha256(x509.load_pem_x509_certificate(intermediate.cert_pem.bytes()).public_bytes(Encoding.DER))
    unrelated, _ = leaf_hashes(trustme.CA().issue_cert("unrelated.example"))
    port = free_port()
    tlsa = f"_{port}._tcp"
    records = ["mta-sts.both.dane.test. IN A 127.0.0.1", '_mta-sts.both.dane.test. IN TXT "v=STSv1; id=1"',
               "unsigned.dane.test. IN MX 10 mx.plain.test.", "mx.plain.test. IN A 127.0.0.1",
               f"{tlsa}.mx.plain.test. IN TLSA 3 1 1 {unrelated}",
               # The TLSA answer leads into broken.test, whose signatures do not validate.
               "bogus.dane.test. IN MX 10 mx.bogus.dane.test.", "mx.bogus.dane.test. IN A 127.0.0.1",
               f"{tlsa}.mx.bogus.dane.test. IN CNAME tlsa.broken.test.",
               f"tlsa.broken.test. IN TLSA 3 1 1 {spki}"]
    for name, record in (("ee", f"3 1 1 {spki}"), ("full", f"3 0 1 {whole}"), ("ta", f"2 0 1 {ta}"),
                         ("bad", f"3 1 1 {unrelated}"), ("notlsa", None), ("both", f"3 1 1 {spki}")):
        records += [f"{name}.dane.test. IN MX 10 mx.{name}.dane.test.", f"mx.{name}.dane.test. IN A 127.0.0.1"]
        if record:
            records.append(f"{tlsa}.mx.{name}.dane.test. IN TLSA {record}")
    knot_port = free_port(udp=True)
    knot = KnotServer("127.0.0.1", root / "knot", ["dane.test", "plain.test", "broken.test"], port=knot_port,
                      signed=["dane.test", "broken.test"])
    knot.start(records)
    web = StsWebServer(server_context(ca.issue_cert("mta-sts.both.dane.test")), {
        # Would refuse the MX: DANE must win (RFC 8461 §2).
        "mta-sts.both.dane.test": "version: STSv1\nmode: enforce\nmx: mx.elsewhere.dane.test\nmax_age: 600\n"})
    try:
        anchors = [key for key in knot.dnskeys("dane.test") if " DNSKEY 257 " in key]
        assert anchors, knot.log_text()
        # broken.test is signed with its own key but anchored to dane.test's: every answer is bogus.
        wrong = [key.replace("dane.test.", "broken.test.", 1) for key in anchors]
        resolver = ValidatingResolver(root / "unbound", ("127.0.0.1", knot_port),
                                      ["dane.test", "plain.test", "broken.test"], anchors + wrong).start()
        web.start()
        try:
            yield World(port, resolver, server_context(good), server_context(intermediate.issue_cert(
                "impostor.dane.test")), server_context(trustme.CA().issue_cert(*MX_NAMES)), web, roots)
        finally:
            web.stop()
            resolver.stop()
    finally:
        knot.stop()


def delivered(world: World, outcome: Outcome, receiver: Recorder, policy: str) -> None:
    assert outcome.kind is Kind.DELIVERED, outcome
    [received] = receiver.wait_for(1)
    assert received.tls
    assert outcome.policy is not None and (outcome.policy.policy, outcome.policy.result) == (policy, "ok"), outcome


@pytest.mark.parametrize("domain", ["ee.dane.test", "full.dane.test"])
def test_dane_ee_match_delivers(world: World, tmp_path: Path, domain: str) -> None:
    with Recorder(tls=world.good, port=world.port) as receiver:
        delivered(world, world.deliver(world.policy(tmp_path), domain), receiver, "dane")


def test_dane_ee_mismatch_defers_and_sends_nothing(world: World, tmp_path: Path) -> None:
    with Recorder(tls=world.good, port=world.port) as receiver:
        outcome = world.deliver(world.policy(tmp_path), "bad.dane.test")
        assert receiver.messages == []
    assert outcome.kind is Kind.TRANSIENT and outcome.reply.enhanced == "4.7.5", outcome
    assert outcome.policy is not None and outcome.policy.fields() == {
        "tls_policy": "dane", "tls_policy_result": "tlsa-invalid"}
    with Recorder(hide={"STARTTLS"}, port=world.port) as stripped:
        outcome = world.deliver(world.policy(tmp_path), "ee.dane.test")
        assert stripped.messages == [], "DANE: never plain text"
    assert outcome.kind is Kind.TRANSIENT and outcome.policy is not None and outcome.policy.policy == "dane"


def test_dane_ta_verifies_the_chain_and_the_name(world: World, tmp_path: Path) -> None:
    with Recorder(tls=world.good, port=world.port) as receiver:
        delivered(world, world.deliver(world.policy(tmp_path), "ta.dane.test"), receiver, "dane")
    for context in (world.wrong_name, world.stranger):
        with Recorder(tls=context, port=world.port) as receiver:
            outcome = world.deliver(world.policy(tmp_path), "ta.dane.test")
            assert receiver.messages == []
        assert outcome.kind is Kind.TRANSIENT and outcome.reply.enhanced == "4.7.5", outcome


def test_a_tlsa_answer_that_fails_validation_rules_the_host_out(world: World, tmp_path: Path) -> None:
    with Recorder(tls=world.good, port=world.port) as receiver:
        outcome = world.deliver(world.policy(tmp_path), "bogus.dane.test")
        assert receiver.messages == [] and receiver.sessions == [], "no session with a host DNSSEC cannot vouch for"
    assert outcome.kind is Kind.TRANSIENT and outcome.reply.enhanced == "4.7.5", outcome
    assert outcome.policy is not None and outcome.policy.result == "dnssec-invalid"
    assert "SERVFAIL" in outcome.reply.text or "failed" in outcome.reply.text, outcome.reply


def test_tlsa_from_an_unsigned_zone_is_ignored(world: World, tmp_path: Path) -> None:
    """mx.plain.test's TLSA record would not match; without DNSSEC it does not count."""
    with Recorder(tls=world.stranger, port=world.port) as receiver:
        outcome = world.deliver(world.policy(tmp_path), "unsigned.dane.test")
        delivered(world, outcome, receiver, "may")


def test_level_dane_requires_records(world: World, tmp_path: Path) -> None:
    strict = world.policy(tmp_path, [TlsPolicyRule(match=["notlsa.dane.test"], level="dane")])
    with Recorder(tls=world.good, port=world.port) as receiver:
        outcome = world.deliver(strict, "notlsa.dane.test")
        assert receiver.messages == [] and receiver.sessions == []
        assert outcome.kind is Kind.TRANSIENT and outcome.policy is not None, outcome
        assert outcome.policy.result == "dane-required"
        delivered(world, world.deliver(world.policy(tmp_path), "notlsa.dane.test"), receiver, "may")


def test_dane_wins_over_mta_sts(world: World, tmp_path: Path) -> None:
    with Recorder(tls=world.good, port=world.port) as receiver:
        delivered(world, world.deliver(world.policy(tmp_path), "both.dane.test"), receiver, "dane")
    assert "mta-sts.both.dane.test" in world.web.requests, "the policy was there, and fetched"


def test_tls_check_explains_dane_and_the_unsigned_host(world: World, tmp_path: Path) -> None:
    from mta.delivery import tlscheck

    resolver = MxResolver(make_resolver([(world.resolver.host, world.resolver.port)], 2.0))
    report = asyncio.run(tlscheck.explain(world.policy(tmp_path), resolver, "ee.dane.test"))
    [host] = report["hosts"]
    assert host["dnssec"] and host["tls_policy"] == "dane" and len(host["tlsa"]) == 1 and host["tls_required"]
    assert "certificate must match TLSA 3 1 1" in tlscheck.render(report)
    report = asyncio.run(tlscheck.explain(world.policy(tmp_path), resolver, "unsigned.dane.test"))
    [host] = report["hosts"]
    assert host["host"] == "mx.plain.test" and host["tls_policy"] == "may" and host["tlsa"] == [], host
