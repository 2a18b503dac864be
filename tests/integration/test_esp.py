"""Relaying through an email service provider: presets against fake providers that speak
each one's documented behaviour (real aiosmtpd servers on loopback: STARTTLS with a verified
certificate, the AUTH user-name convention, EHLO SIZE, the throttling reply), and route quotas
measured where the provider would measure them."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from tests.conftest import HOSTS, World
from tests.harness import send_mail
from tests.peers.net import free_port
from tests.peers.smarthost import SmartHost

# https://docs.aws.amazon.com/ses/latest/dg/manage-sending-quotas-errors.html
SES_THROTTLE = "454 Throttling failure: Maximum sending rate exceeded"


def provider(world: World, user: str, password: str, **behaviour: object) -> SmartHost:
    host = SmartHost(HOSTS["relay"], free_port(HOSTS["relay"]), world.root, user=user, password=password,
                     **behaviour)  # type: ignore[arg-type]
    host.start()
    world.others.append(host)
    return host


def secret(world: World, content: str) -> Path:
    path = world.root / "esp-secret"
    path.write_text(content + "\n")
    return path


def esp_route(host: SmartHost, preset: dict[str, object], auth_file: Path, **extra: object) -> dict[str, object]:
    # The preset's host is the real provider's: only relay (and the test CA) point at the fake one.
    return {"domains": ["*"], **preset, "relay": f"{host.host}:{host.port}", "ca_file": str(host.ca_file),
            "auth_file": str(auth_file), **extra}


def test_sendgrid_logs_in_as_apikey_with_the_key_from_the_secret(world: World) -> None:
    host = provider(world, "apikey", "SG.test-key")
    server = world.mta({"routes": [esp_route(host, {"provider": "sendgrid"}, secret(world, "SG.test-key"))]})
    send_mail(server.port, "app@sender.test", ["a@dest.test"])
    server.wait_for_queue(lambda q: q == [], timeout=20, what="queue drained")
    [message] = host.received
    assert message.user == "apikey" and message.tls and host.failed_logins == 0
    assert "SG.test-key" not in server.log()


def test_postmark_sends_the_server_token_as_user_and_password(world: World) -> None:
    token = "0f8fad5b-d9cb-469f-a165-70867728950e"
    host = provider(world, token, token)
    server = world.mta({"routes": [esp_route(host, {"provider": "postmark"}, secret(world, token))]})
    send_mail(server.port, "app@sender.test", ["a@dest.test"])
    server.wait_for_queue(lambda q: q == [], timeout=20, what="queue drained")
    assert [m.user for m in host.received] == [token] and host.failed_logins == 0


def test_a_message_over_the_providers_size_limit_fails_at_once_and_bounces(world: World) -> None:
    # The provider announces SIZE 20000; the route carries the same limit (as a preset would).
    host = provider(world, "postmaster@mg.sender.test", "mg-pass", size_limit=20000)
    server = world.mta({"routes": [esp_route(host, {"provider": "mailgun", "region": "eu"},
                                             secret(world, "postmaster@mg.sender.test:mg-pass"),
                                             max_message_size=20000)]})
    send_mail(server.port, "app@sender.test", ["big@dest.test"], body=("y" * 70 + "\r\n") * 400)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not host.received:
        time.sleep(0.2)
    # Only the bounce reached the provider (it relays everything, bounces too): never the big message.
    [bounce] = host.received
    assert bounce.sender == "<>" and bounce.recipients == ["app@sender.test"]
    assert b"5.3.4" in bounce.data and b"accepts at most 20000" in bounce.data


def test_ses_throttling_reply_defers_and_backs_the_route_off(world: World) -> None:
    host = provider(world, "AKIAEXAMPLE", "c2VjcmV0", rate=(1, 600.0), throttle_reply=SES_THROTTLE)
    server = world.mta({"routes": [esp_route(host, {"provider": "ses", "region": "us-east-1"},
                                             secret(world, "AKIAEXAMPLE:c2VjcmV0"))]})
    for n in range(3):
        send_mail(server.port, "app@sender.test", [f"r{n}@dest.test"])
    items = server.wait_for_queue(lambda q: len(q) == 2 and all(i["attempts"] >= 1 for i in q), timeout=30,
                                  what="two deferred")
    # 454 without an enhanced code is a throttle only by SES's documented text.
    assert host.throttled >= 1 and "throttled" in server.log()
    replies = [i["recipients"][0]["last_reply"] for i in items]
    # The throttled one carries SES's reply; the route's cool-down held the other back.
    assert any("Throttling failure" in r for r in replies), replies
    assert all("Throttling failure" in r or "asked to slow down" in r for r in replies), replies
    assert len(host.received) == 1 and host.received[0].sender != "<>"  # nothing bounced


def test_a_burst_from_parallel_clients_stays_within_the_quota_and_all_arrive(world: World) -> None:
    per_second, clients, each = 5, 6, 5
    # The provider throttles past 5 a second, as SES does past the account's sending rate.
    host = provider(world, "AKIAEXAMPLE", "c2VjcmV0", rate=(per_second, 1.0), throttle_reply=SES_THROTTLE)
    server = world.mta({"routes": [esp_route(host, {"provider": "ses", "region": "us-east-1"},
                                             secret(world, "AKIAEXAMPLE:c2VjcmV0"),
                                             messages_per_second=per_second)]})
    errors: list[BaseException] = []

    def client(c: int) -> None:
        try:
            for n in range(each):
                send_mail(server.port, "app@sender.test", [f"c{c}-{n}@dest.test"])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    total = clients * each
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and len(host.received) < total:
        time.sleep(0.2)
    arrived = sorted(m.arrived for m in host.received)
    busiest = max(sum(1 for t in arrived if first <= t <= first + 1.0) for first in arrived)
    print(f"{total} messages in {arrived[-1] - arrived[0]:.1f}s, busiest second {busiest}")
    assert sorted(r for m in host.received for r in m.recipients) == sorted(
        f"c{c}-{n}@dest.test" for c in range(clients) for n in range(each))  # none lost, none twice
    assert busiest <= per_second and host.throttled == 0
    server.wait_for_queue(lambda q: q == [], timeout=20, what="queue drained")


def test_doctor_opens_each_route_up_to_auth_without_sending_mail(world: World) -> None:
    good = provider(world, "apikey", "SG.right-key")
    routes = [esp_route(good, {"provider": "sendgrid", "name": "good"}, secret(world, "SG.right-key"),
                        domains=["good.test"])]
    wrong = world.root / "wrong-secret"
    wrong.write_text("SG.wrong-key\n")
    routes.append(esp_route(good, {"provider": "sendgrid", "name": "wrong-key"}, wrong, domains=["wrong.test"]))
    routes.append({"name": "down", "domains": ["down.test"], "relay": f"{HOSTS['relay']}:{free_port(HOSTS['relay'])}",
                   "tls": "starttls"})
    server = world.mta({"routes": routes}, start=False)
    done = server.cli("doctor", "--json")
    results = {item["name"]: item for item in json.loads(done.stdout)}
    assert results["route:good"]["status"] == "pass", results["route:good"]
    assert "TLS TLSv1" in results["route:good"]["reason"] and "logged in" in results["route:good"]["reason"]
    assert results["route:wrong-key"]["status"] == "fail"
    assert "authentication to smart host" in results["route:wrong-key"]["reason"]
    assert results["route:down"]["status"] == "fail" and "cannot connect" in results["route:down"]["reason"]
    assert done.returncode == 1
    assert good.received == [] and good.failed_logins >= 1  # the wrong key was tried, no mail sent
