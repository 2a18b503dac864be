"""Relaying through a smart host: TLS verified against the configured CA, AUTH from a file."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import HOSTS, World
from tests.harness import send_mail
from tests.peers.net import free_port
from tests.peers.smarthost import SmartHost

PASSWORD = "s3cret-pass:with-colon"


def smarthost(world: World, implicit: bool = False) -> SmartHost:
    host = SmartHost(HOSTS["relay"], free_port(HOSTS["relay"]), world.root, user="relayuser",
                     password=PASSWORD, implicit_tls=implicit)
    host.start()
    world.others.append(host)
    return host


def credentials(world: World, password: str = PASSWORD) -> Path:
    path = world.root / "relay-credentials"
    path.write_text(f"relayuser:{password}\n")
    return path


def route(host: SmartHost, auth_file: Path, domains: list[str], tls: str, **extra: object) -> dict:  # type: ignore[type-arg]
    return {"domains": domains, "relay": f"{host.host}:{host.port}", "tls": tls, "auth_file": str(auth_file),
            "ca_file": str(host.ca_file), **extra}


def wait_relayed(host: SmartHost, count: int, server) -> None:  # type: ignore[no-untyped-def]
    server.wait_for_queue(lambda q: q == [], timeout=20, what="queue drained")
    assert len(host.received) == count


def test_default_route_relays_everything_with_starttls_and_auth(world: World) -> None:
    dest = world.sink("dest")
    host = smarthost(world)
    server = world.mta({"routes": [route(host, credentials(world), ["*"], "starttls")]})
    send_mail(server.port, "app@sender.test", ["a@dest.test", "b@anything.example"])
    wait_relayed(host, 1, server)
    [message] = host.received
    assert message.user == "relayuser" and message.tls
    assert sorted(message.recipients) == ["a@dest.test", "b@anything.example"]
    assert dest.messages() == []
    assert PASSWORD not in server.log()


def test_implicit_tls_route(world: World) -> None:
    host = smarthost(world, implicit=True)
    server = world.mta({"routes": [route(host, credentials(world), ["*"], "implicit")]})
    send_mail(server.port, "app@sender.test", ["a@dest.test"])
    wait_relayed(host, 1, server)
    assert host.received[0].user == "relayuser"


def test_only_the_routed_domain_goes_through_the_smart_host(world: World) -> None:
    amx = world.sink("amx")
    host = smarthost(world)
    server = world.mta({"routes": [route(host, credentials(world), ["dest.test"], "starttls")]})
    send_mail(server.port, "app@sender.test", ["a@dest.test", "b@amx.test"])
    amx.wait_for_messages(1, timeout=20)
    wait_relayed(host, 1, server)
    assert host.received[0].recipients == ["a@dest.test"]


def test_wrong_password_defers_and_never_logs_the_secret(world: World) -> None:
    host = smarthost(world)
    server = world.mta({"routes": [route(host, credentials(world, "wrong-password"), ["*"], "starttls")]})
    send_mail(server.port, "app@sender.test", ["a@dest.test"])
    [item] = server.wait_for_queue(lambda q: q and q[0]["attempts"] >= 1, what="failed attempt")
    assert item["recipients"][0]["last_reply"].startswith("454 4.7.0 authentication to smart host")
    assert host.received == [] and host.failed_logins >= 1
    assert "wrong-password" not in server.log()


def test_untrusted_certificate_is_refused(world: World) -> None:
    host = smarthost(world)
    config = route(host, credentials(world), ["*"], "starttls")
    del config["ca_file"]  # system roots do not know the test CA
    server = world.mta({"routes": [config]})
    send_mail(server.port, "app@sender.test", ["a@dest.test"])
    [item] = server.wait_for_queue(lambda q: q and q[0]["attempts"] >= 1, what="failed attempt")
    assert "4.7.5 TLS with" in item["recipients"][0]["last_reply"]
    assert host.received == []


def test_routes_to_one_relay_keep_their_own_credentials(world: World) -> None:
    host = SmartHost(HOSTS["relay"], free_port(HOSTS["relay"]), world.root, user="relayuser", password=PASSWORD,
                     more_users={"billing": "other-secret"})
    host.start()
    world.others.append(host)
    billing = world.root / "billing-credentials"
    billing.write_text("billing:other-secret\n")
    server = world.mta({"routes": [route(host, credentials(world), ["alpha.example"], "starttls"),
                                   route(host, billing, ["beta.example"], "starttls")]})
    send_mail(server.port, "app@sender.test", ["x@alpha.example", "y@beta.example"])
    wait_relayed(host, 2, server)
    # One relay address, two routes: each route's mail went with its own login.
    users = {message.recipients[0]: message.user for message in host.received}
    assert users == {"x@alpha.example": "relayuser", "y@beta.example": "billing"}
