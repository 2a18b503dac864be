"""Per-pod egress identity and the deliverability self-checks, against a real DNS server."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.conftest import HOSTS, RECORDS, ZONES, World
from tests.fakes.kube_api import FakeKubeApi
from tests.harness import MtaServer, send_mail
from tests.peers.net import wait_port
from tests.peers.recorder import Recorder

EGRESS = "127.0.0.50"
HELO = "out.sender.test"


def keygen(world: World) -> tuple[str, str]:
    out = world.root / "id.pem"
    done = subprocess.run([sys.executable, "-P", "-m", "mta.cli", "dkim", "keygen", "--domain", "sender.test",
                           "--selector", "id", "--type", "ed25519", "--out", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return str(out), done.stdout.strip()


def publish(world: World, dkim_record: str, *, spf_ip: str = EGRESS, ptr_name: str = HELO) -> None:
    world.dns.replace_records([
        *RECORDS,
        dkim_record,
        f'sender.test. IN TXT "v=spf1 ip4:{spf_ip} -all"',
        '_dmarc.sender.test. IN TXT "v=DMARC1; p=reject; rua=mailto:dmarc@sender.test"',
        f"{EGRESS.split('.')[3]}.0.0.127.in-addr.arpa. IN PTR {ptr_name}.",
        f"{HELO}. IN A {EGRESS}",
        # the blocklist lists 127.0.0.66
        "66.0.0.127.bl.test. IN A 127.0.0.2",
    ], [*ZONES, "127.in-addr.arpa", "bl.test"])


def identity_config(world: World, key_file: str, source: str = EGRESS, **identity: object) -> dict:  # type: ignore[type-arg]
    return {
        "dkim": {"keys": [{"domain": "sender.test", "selector": "id", "key_file": key_file}]},
        "identity": {"pod_name": "mta-0",
                     "pods": {"mta-0": {"source_address": source, "hostname": HELO},
                              "mta-1": {"source_address": "127.0.0.51", "hostname": "other.sender.test"}},
                     "dnsbl_zones": ["bl.test"], "probe": f"{HOSTS['dest']}:{world.port}", **identity},
    }


def doctor(server: MtaServer) -> tuple[int, dict[str, dict[str, str]]]:
    done = server.cli("doctor", "--json")
    return done.returncode, {item["name"]: item for item in json.loads(done.stdout)}


def test_doctor_passes_when_dns_is_right(world: World) -> None:
    key_file, record = keygen(world)
    publish(world, record)
    world.sink("dest")
    server = world.mta(identity_config(world, key_file), start=False)
    code, results = doctor(server)
    assert {name: r["status"] for name, r in results.items()} == {
        "fcrdns": "pass", "spf:sender.test": "pass", "dkim:id._domainkey.sender.test": "pass",
        "dmarc:sender.test": "pass", "dnsbl:bl.test": "pass", "port25": "pass",
        "https": "warn"}, results  # identity.https_probe unset: said, not failed (test_tlsrpt checks it set)
    assert code == 0
    assert results["dmarc:sender.test"]["reason"] == "DMARC policy p=reject"


@pytest.mark.parametrize(("case", "failing"), [
    ("ptr-mismatch", {"fcrdns"}),
    ("spf-without-ip", {"spf:sender.test"}),
    ("listed", {"dnsbl:bl.test", "fcrdns", "spf:sender.test"}),
    ("wrong-dkim-key", {"dkim:id._domainkey.sender.test"}),
])
def test_doctor_names_what_is_wrong(world: World, case: str, failing: set[str]) -> None:
    key_file, record = keygen(world)
    source = EGRESS
    if case == "ptr-mismatch":
        publish(world, record, ptr_name="mail.elsewhere.test")
    elif case == "spf-without-ip":
        publish(world, record, spf_ip="127.0.0.99")
    elif case == "listed":
        publish(world, record)
        source = "127.0.0.66"
    else:
        _, other = keygen_other(world)
        publish(world, other)
    world.sink("dest")
    server = world.mta(identity_config(world, key_file, source), start=False)
    code, results = doctor(server)
    assert code == 1
    assert {name for name, r in results.items() if r["status"] == "fail"} == failing, results


@pytest.mark.parametrize("bind", [True, False])
def test_doctor_compares_the_address_the_probe_sees_with_the_egress_address(world: World, bind: bool) -> None:
    """A probe that echoes the client address (as Exim's and Gmail's MXes do in their EHLO reply).
    Unbound, the egress address is one a gateway's SNAT should apply; none does here, so mail
    leaves from 127.0.0.1: the drift that sends from the wrong IP with the wrong PTR."""
    key_file, record = keygen(world)
    publish(world, record)
    with Recorder(host=HOSTS["dest"], port=world.port, echo=True):
        config = identity_config(world, key_file)
        config["identity"]["pods"]["mta-0"]["bind"] = bind
        server = world.mta(config, start=False)
        code, results = doctor(server)
    seen = results["egress_ip"]
    if bind:
        assert seen["status"] == "pass" and f"come from {EGRESS}, as configured" in seen["reason"], seen
    else:
        assert seen["status"] == "fail" and code == 1, seen
        assert f"come from 127.0.0.1, not from the configured egress address {EGRESS}" in seen["reason"]
    assert results["port25"]["status"] == "pass"


def keygen_other(world: World) -> tuple[str, str]:
    out = world.root / "other.pem"
    done = subprocess.run([sys.executable, "-P", "-m", "mta.cli", "dkim", "keygen", "--domain", "sender.test",
                           "--selector", "id", "--type", "ed25519", "--out", str(out)],
                          capture_output=True, text=True, timeout=60)
    return str(out), done.stdout.strip()


def test_pod_identity_binds_the_egress_address_and_helo(world: World) -> None:
    key_file, record = keygen(world)
    publish(world, record)
    sink = world.sink("dest")
    server = world.mta(identity_config(world, key_file))
    send_mail(server.port, "app@sender.test", ["user@dest.test"])
    [message] = sink.wait_for_messages(1, timeout=20)
    assert (message.client_addr, message.helo) == (EGRESS, HELO)


def test_enforced_checks_hold_mail_until_dns_is_fixed(world: World) -> None:
    key_file, record = keygen(world)
    publish(world, record, spf_ip="127.0.0.99")  # SPF does not list the egress address
    sink = world.sink("dest")
    server = world.mta(identity_config(world, key_file, enforce=True, check_interval="1s"), start=False)
    server.start(wait=False)  # it will not be ready: that is the point
    wait_port("127.0.0.1", server.port, timeout=20)
    server.wait_for_log("delivery_paused")
    send_mail(server.port, "app@sender.test", ["user@dest.test"])
    status, body = server.readyz()
    assert status == 503 and not body["checks"]["identity"]["ok"]
    assert "spf:sender.test" in body["checks"]["identity"]["detail"]
    time.sleep(2)
    assert sink.messages() == []
    assert len(server.queue_list()) == 1
    publish(world, record)
    sink.wait_for_messages(1, timeout=30)
    assert server.readyz()[0] == 200


def test_failing_self_checks_are_reported_as_pod_events(world: World) -> None:
    key_file, record = keygen(world)
    publish(world, record, spf_ip="127.0.0.99")
    world.sink("dest")
    with FakeKubeApi() as kube:
        kube.add_statefulset("mail", "mta", 1)
        config = identity_config(world, key_file, check_interval="1s")
        config["kubernetes"] = {"enabled": True, "api_url": kube.url, "namespace": "mail", "pod_name": "mta-0",
                                "pod_uid": "uid-0"}
        server = world.mta(config)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not kube.events_for("mail", "mta-0"):
            time.sleep(0.2)
        [failed] = kube.events_for("mail", "mta-0")
        assert failed["reason"] == "SelfCheckFailed" and failed["type"] == "Warning"
        assert "spf:sender.test" in failed["message"]
        publish(world, record)
        while time.monotonic() < deadline + 20 and len(kube.events_for("mail", "mta-0")) < 2:
            time.sleep(0.2)
        assert [e["reason"] for e in kube.events_for("mail", "mta-0")] == ["SelfCheckFailed", "SelfCheckPassed"]
        server.stop()


def test_doctor_warns_without_dkim_key_or_sending_domain_and_strict_fails_on_warnings(world: World) -> None:
    server = world.mta({}, start=False)
    done = server.cli("doctor", "--json")
    results = {item["name"]: item for item in json.loads(done.stdout)}
    assert results["dkim"]["status"] == "warn" and "dkim.keys" in results["dkim"]["reason"]
    assert results["domains"]["status"] == "warn" and "sending_domains" in results["domains"]["reason"]
    assert not [r for r in results.values() if r["status"] == "fail"]
    assert done.returncode == 0  # warnings alone pass ...
    strict = server.cli("doctor", "--strict")
    assert strict.returncode == 1, strict.stdout  # ... unless --strict
    assert "WARN  dkim: no DKIM key configured" in strict.stdout


@pytest.mark.parametrize("domain", ["not a domain", "-bad-.test", "bad_x.test", "nodot", "a..b.test", ""])
def test_dkim_keygen_rejects_an_invalid_domain(world: World, domain: str) -> None:
    out = world.root / "bad.pem"
    done = subprocess.run([sys.executable, "-P", "-m", "mta.cli", "dkim", "keygen", f"--domain={domain}",
                           "--selector", "s1", "--type", "ed25519", "--out", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--domain" in done.stderr and "is not a domain" in done.stderr
    assert not out.exists()


def test_dkim_keygen_prints_the_record_for_the_normalised_domain(world: World) -> None:
    out = world.root / "ok.pem"
    done = subprocess.run([sys.executable, "-P", "-m", "mta.cli", "dkim", "keygen", "--domain", "Sender.TEST.",
                           "--selector", "s1", "--type", "ed25519", "--out", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("s1._domainkey.sender.test. IN TXT ")
    bad_selector = subprocess.run([sys.executable, "-P", "-m", "mta.cli", "dkim", "keygen", "--domain", "sender.test",
                                   "--selector", "a/b", "--out", str(world.root / "x.pem")],
                                  capture_output=True, text=True, timeout=60)
    assert bad_selector.returncode == 2 and "--selector" in bad_selector.stderr
