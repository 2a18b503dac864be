"""Failover between routes: a provider that goes down mid-run opens its route's circuit
breaker, its mail goes to the fallback provider at once (nothing lost, nothing twice), and
when it is back a probe closes the breaker and mail returns to it.  The providers are real
SMTP servers (aiosmtpd, STARTTLS, AUTH) on loopback."""

from __future__ import annotations

import time
from pathlib import Path

from tests.conftest import HOSTS, World
from tests.harness import send_mail
from tests.obs.logs import events, wait_for_event
from tests.obs.scrape import wait_for_sample
from tests.peers.net import free_port
from tests.peers.smarthost import SmartHost


def provider(world: World, name: str, user: str, password: str) -> tuple[SmartHost, Path]:
    workdir = world.root / f"esp-{name}"
    workdir.mkdir()
    host = SmartHost(HOSTS["relay"], free_port(HOSTS["relay"]), workdir, user=user, password=password)
    host.start()
    world.others.append(host)
    secret = workdir / "credentials"
    secret.write_text(f"{user}:{password}\n")
    secret.chmod(0o600)
    return host, secret


def route(name: str, host: SmartHost, secret: Path, **extra: object) -> dict[str, object]:
    return {"name": name, "relay": f"{host.host}:{host.port}", "ca_file": str(host.ca_file),
            "auth_file": str(secret), **extra}


def subjects(host: SmartHost) -> list[str]:
    return [next(line for line in m.data.decode().splitlines() if line.startswith("Subject:"))
            for m in host.received]


def test_a_provider_down_mid_run_fails_over_and_mail_returns_when_it_is_back(world: World) -> None:
    primary, primary_secret = provider(world, "primary", "primary-user", "primary-password")
    backup, backup_secret = provider(world, "backup", "backup-user", "backup-password")
    server = world.mta({"routes": [
        route("primary", primary, primary_secret, domains=["*"], fallback=["backup"],
              breaker={"min_attempts": 2, "failure_ratio": 0.5, "window": "60s", "cooldown": "3s"}),
        route("backup", backup, backup_secret)]})

    def send(n: int) -> None:
        send_mail(server.port, "app@sender.test", [f"user{n}@dest.test"], subject=f"message {n}")

    send(0)
    server.wait_for_queue(lambda q: q == [], what="the first message delivered")
    assert len(primary.received) == 1 and backup.received == []

    primary.stop()  # the provider goes down
    for n in range(1, 4):
        send(n)
    opened = wait_for_event(server, "route_breaker_opened")
    assert opened[0]["route"] == "primary" and opened[0]["fallback"] == "backup"
    server.wait_for_queue(lambda q: q == [], timeout=30, what="the outage's mail delivered through the fallback")
    assert len(backup.received) == 3 and [m.user for m in backup.received] == ["backup-user"] * 3
    wait_for_sample(server, "kubemta_route_breaker_open", 1.0, route="primary")

    primary.start()  # back
    time.sleep(3.5)  # the cool-down: the next message probes it
    send(4)
    wait_for_event(server, "route_breaker_closed")
    wait_for_sample(server, "kubemta_route_breaker_open", 0.0, route="primary")
    for n in range(5, 7):
        send(n)
    server.wait_for_queue(lambda q: q == [], timeout=30, what="mail back on the primary")
    assert len(primary.received) == 4 and len(backup.received) == 3
    everything = subjects(primary) + subjects(backup)
    assert sorted(everything) == sorted(f"Subject: message {n}" for n in range(7)), everything  # once each
    assert len(events(server, "route_breaker_opened")) == 1


def test_a_route_without_a_fallback_waits_as_before_and_direct_needs_a_signing_key(world: World) -> None:
    primary, primary_secret = provider(world, "primary", "primary-user", "primary-password")
    sink = world.sink("dest")
    server = world.mta({"routes": [
        route("primary", primary, primary_secret, domains=["dest.test"], fallback=["direct"],
              breaker={"min_attempts": 1, "cooldown": "60s"})]})
    primary.stop()
    send_mail(server.port, "app@sender.test", ["a@dest.test"])
    wait_for_event(server, "route_breaker_opened")
    # sender.test has no DKIM key here: its mail must not leave from our own IP unsigned.
    time.sleep(2)
    [item] = server.queue_list()
    assert item["attempts"] >= 1 and sink.messages() == []


def test_direct_takes_over_for_mail_it_signs_as_the_senders_domain(world: World) -> None:
    from mta.dkim import keys

    key = world.root / "sender.pem"
    keys.write_private_key(keys.generate("ed25519"), key)
    primary, primary_secret = provider(world, "primary", "primary-user", "primary-password")
    sink = world.sink("dest")
    server = world.mta({"dkim": {"keys": [{"domain": "sender.test", "selector": "s1", "key_file": str(key)}]},
                        "routes": [route("primary", primary, primary_secret, domains=["dest.test"],
                                         fallback=["direct"], breaker={"min_attempts": 1, "cooldown": "60s"})]})
    primary.stop()
    send_mail(server.port, "app@sender.test", ["a@dest.test"])
    wait_for_event(server, "route_breaker_opened")
    [message] = sink.wait_for_messages(1, timeout=20)
    assert message.recipients == ["a@dest.test"] and b"DKIM-Signature:" in message.data
    server.wait_for_queue(lambda q: q == [], what="delivered direct")
