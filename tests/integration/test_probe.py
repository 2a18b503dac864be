"""``mta probe``: a tagged message through a real kubemta listener, its queue and delivery, into a
mailbox served by a real Dovecot over IMAPS; the result pushed to a real Pushgateway."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import HOSTS, World
from tests.harness import MtaServer
from tests.peers.imap import MailboxServer
from tests.peers.net import free_port
from tests.peers.pushgateway import Pushgateway
from tests.peers.smarthost import SmartHost


@pytest.fixture
def mailbox(world: World) -> Iterator[MailboxServer]:
    server = MailboxServer(world.root / "mailbox", HOSTS["dest"], world.port)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pushgateway() -> Iterator[Pushgateway]:
    gateway = Pushgateway().start()
    try:
        yield gateway
    finally:
        gateway.stop()


def probe_file(world: World, server: MtaServer, mailbox: MailboxServer, gateway: Pushgateway,
               timeout: str) -> Path:
    credentials = world.root / "imap-credentials"
    credentials.write_text(f"{mailbox.user}:{mailbox.password}\n")
    credentials.chmod(0o600)
    path = world.root / "probe.yaml"
    path.write_text(yaml.safe_dump({
        "submit": f"127.0.0.1:{server.port}", "submit_tls": "none",
        "sender": "probe@sender.test", "to": "probe@dest.test",
        "imap": {"address": f"127.0.0.1:{mailbox.imap_port}", "tls": "implicit", "ca_file": str(mailbox.ca_file),
                 "credentials_file": str(credentials)},
        "timeout": timeout, "poll": "0.3s", "pushgateway": gateway.url, "name": "direct"}))
    return path


def probe(path: Path) -> tuple[int, dict[str, object]]:
    done = subprocess.run([sys.executable, "-P", "-m", "mta.cli", "probe", "-c", str(path), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


def sample(gateway: Pushgateway, name: str) -> float:
    [(labels, value)] = gateway.metrics()[name]
    assert labels["job"] == "kubemta_probe" and labels["probe"] == "direct", labels
    return value


def test_the_probe_finds_its_message_in_the_mailbox_and_pushes_the_latency(
        world: World, mailbox: MailboxServer, pushgateway: Pushgateway) -> None:
    server = world.mta()
    code, result = probe(probe_file(world, server, mailbox, pushgateway, "30s"))
    assert code == 0 and result["success"] is True, result
    assert result["queue_id"] and 0 < float(result["latency"]) < 30  # type: ignore[arg-type]
    assert result["pushed"] == "ok"
    assert sample(pushgateway, "kubemta_probe_success") == 1.0
    assert sample(pushgateway, "kubemta_probe_latency_seconds") == pytest.approx(result["latency"])
    assert sample(pushgateway, "kubemta_probe_last_run_timestamp_seconds") > time.time() - 120
    assert mailbox.handler.delivered == 1 and mailbox.messages() == 0  # found, then deleted over IMAP


def test_a_message_that_never_arrives_fails_the_probe(world: World, mailbox: MailboxServer,
                                                      pushgateway: Pushgateway) -> None:
    server = world.mta()
    mailbox.controller.stop()  # the mailbox's MX stops taking mail: the path is broken
    code, result = probe(probe_file(world, server, mailbox, pushgateway, "3s"))
    assert code == 1 and result["success"] is False and "not in probe@dest.test after 3s" in str(result["reason"])
    assert result["queue_id"], "the listener took it: the failure is further down the path"
    assert sample(pushgateway, "kubemta_probe_success") == 0.0
    assert "kubemta_probe_latency_seconds" not in pushgateway.metrics()
    assert [item["id"] for item in server.queue_list()] == [result["queue_id"]]


def test_a_refused_submission_fails_the_probe_with_the_listeners_reply(world: World, mailbox: MailboxServer,
                                                                      pushgateway: Pushgateway) -> None:
    server = world.mta({"listeners": [{"name": "relay", "address": "127.0.0.1:{port}", "mode": "relay",
                                       "trusted_networks": ["192.0.2.0/24"]}]})
    code, result = probe(probe_file(world, server, mailbox, pushgateway, "3s"))
    assert code == 1 and "submission to" in str(result["reason"]) and "5.7.1" in str(result["reason"]), result


def test_through_a_provider_the_probe_takes_its_delivery_event_as_arrival(world: World,
                                                                         pushgateway: Pushgateway) -> None:
    """The route goes to a fake SendGrid that, as SendGrid does, POSTs its delivery event, naming
    the message's Message-ID, to the probe's webhook."""
    listen = f"127.0.0.1:{free_port()}"
    workdir = world.root / "esp"
    workdir.mkdir()
    esp = SmartHost(HOSTS["relay"], free_port(HOSTS["relay"]), workdir, user="apikey", password="SG.key",
                    events_url=f"http://{listen}/kubemta-probe")
    esp.start()
    world.others.append(esp)
    secret = workdir / "credentials"
    secret.write_text("SG.key\n")
    server = world.mta({"routes": [{"domains": ["*"], "provider": "sendgrid", "relay": f"{esp.host}:{esp.port}",
                                    "ca_file": str(esp.ca_file), "auth_file": str(secret)}]})
    path = world.root / "probe-webhook.yaml"
    path.write_text(yaml.safe_dump({
        "submit": f"127.0.0.1:{server.port}", "submit_tls": "none", "sender": "probe@sender.test",
        "to": "someone@gmail.test", "webhook": {"listen": listen}, "timeout": "20s",
        "pushgateway": pushgateway.url, "name": "direct"}))
    code, result = probe(path)
    assert code == 0 and result["success"] is True and "delivery event" in str(result["reason"]), result
    assert esp.events_posted == 1 and len(esp.received) == 1
    assert sample(pushgateway, "kubemta_probe_success") == 1.0


def test_a_probe_file_needs_exactly_one_way_to_see_arrival(world: World) -> None:
    path = world.root / "bad-probe.yaml"
    path.write_text(yaml.safe_dump({"submit": "127.0.0.1:25", "sender": "a@b.test", "to": "c@d.test"}))
    done = subprocess.run([sys.executable, "-P", "-m", "mta.cli", "probe", "-c", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "set one of imap (the mailbox) and webhook" in done.stderr, done.stderr
