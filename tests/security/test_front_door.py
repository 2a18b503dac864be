"""Attacks on the front door of a running ``mta serve``, by many clients at once over loopback.

Each test mounts one attack with concurrent real sockets from several
loopback addresses, measures what the server holds (its open descriptors,
which connections it kept and which it refused) and checks the bound the
configuration promises: PROXY headers only from ``proxy_sources`` and per-IP
limits on the address a header names; TLS handshakes counted from accept,
capped and timed out; slots reserved for trusted networks; junk EHLOs, idle
sessions and old sessions ended; half-sent HTTP requests timed out; and at
shutdown ``421 4.3.2`` for idle sessions while transactions finish.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import struct
import time
import urllib.request
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
import trustme
import yaml

from mta.config import ConfigError, load
from mta.drain import wire
from mta.drain.receiver import HandoffServer
from mta.intake import Intake
from tests.conftest import World
from tests.harness import HOST, MtaServer
from tests.obs.logs import events
from tests.obs.scrape import Scrape, scrape, wait_for_sample
from tests.peers.net import free_port
from tests.security.conftest import write_cert

T = TypeVar("T")

# Loopback addresses the attacks come from; all of 127.0.0.0/8 is local on Linux.
ATTACKERS = [f"127.0.1.{n}" for n in range(1, 21)]
BALANCER = "127.0.0.5"
TRUSTED = "127.0.0.1"


def run(coro: Awaitable[T], timeout: float = 60.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())


def open_fds(server: MtaServer) -> int:
    assert server.proc is not None
    return len(os.listdir(f"/proc/{server.proc.pid}/fd"))


class Client:
    """One raw connection: exact bytes out, whole replies in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int, source: str = TRUSTED, preamble: bytes = b"",
                      context: ssl.SSLContext | None = None) -> Client:
        reader, writer = await asyncio.open_connection(HOST, port, local_addr=(source, 0), ssl=context,
                                                       server_hostname="mta.kubemta.test" if context else None)
        if preamble:
            writer.write(preamble)
            await writer.drain()
        return cls(reader, writer)

    async def reply(self, timeout: float = 10.0) -> bytes:
        """One whole reply; b"" when the server closed the connection instead."""
        lines = []
        while True:
            try:
                line = await asyncio.wait_for(self.reader.readline(), timeout)
            except ConnectionError:
                line = b""
            if not line:
                return b"".join(lines)
            lines.append(line)
            if line[3:4] != b"-":
                return b"".join(lines)

    async def cmd(self, line: bytes, timeout: float = 10.0) -> bytes:
        """Send one command and read its reply (b"" when the server has closed the connection)."""
        self.writer.write(line + b"\r\n")
        try:
            await self.writer.drain()
        except ConnectionError:
            return b""
        return await self.reply(timeout)

    async def closed(self, timeout: float) -> bool:
        """Does the server close the connection within ``timeout`` (reading and dropping what it sends)?"""
        try:
            async with asyncio.timeout(timeout):
                while await self.reader.read(4096):
                    pass
        except TimeoutError:
            return False
        except ConnectionError:
            pass
        return True

    def close(self) -> None:
        self.writer.close()


async def connect_all(port: int, sources: list[str], per_source: int, **kwargs: Any) -> list[Client]:
    return await asyncio.gather(*(Client.connect(port, source, **kwargs)
                                  for source in sources for _ in range(per_source)))


async def greetings(clients: list[Client], timeout: float = 10.0) -> list[bytes]:
    return await asyncio.gather(*(client.reply(timeout) for client in clients))


def close_all(clients: list[Client]) -> None:
    for client in clients:
        client.close()


def relay(world: World, listener: dict[str, Any] | None = None, limits: dict[str, Any] | None = None,
          **config: Any) -> MtaServer:
    base = {"name": "relay", "address": "127.0.0.1:{port}", "mode": "relay", "trusted_networks": [f"{TRUSTED}/32"]}
    return world.mta({"listeners": [{**base, **(listener or {})}], "limits": limits or {}, **config})


def rejected(server: MtaServer, reason: str) -> list[dict[str, Any]]:
    return [item for item in events(server, "rejected") if reason in str(item.get("reason"))]


# -- 1. PROXY headers ----------------------------------------------------------------------------------------------

def proxy_v2(src: str, dst: str = "127.0.0.1", sport: int = 40000, dport: int = 25) -> bytes:
    body = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


def proxy_v1(src: str, dst: str = "127.0.0.1") -> bytes:
    return f"PROXY TCP4 {src} {dst} 40000 25\r\n".encode()


PROXIED = {"proxy_protocol": True, "proxy_sources": [f"{BALANCER}/32"], "trusted_networks": ["198.51.100.0/24"]}


def test_a_proxy_header_from_outside_proxy_sources_is_refused_before_any_banner(world: World) -> None:
    server = relay(world, PROXIED)

    async def attack() -> tuple[list[bytes], bytes, bytes]:
        # Direct clients claim a trusted address, in both header versions.
        forged = [Client.connect(server.port, source, preamble=header("198.51.100.7"))
                  for source in ATTACKERS[:10] for header in (proxy_v1, proxy_v2)]
        clients = await asyncio.gather(*forged)
        answers = await greetings(clients)
        close_all(clients)
        balancer = await Client.connect(server.port, BALANCER, preamble=proxy_v2("198.51.100.7"))
        banner = await balancer.reply()
        await balancer.cmd(b"EHLO app.kubemta.test")
        await balancer.cmd(b"MAIL FROM:<app@sender.test>")
        accepted = await balancer.cmd(b"RCPT TO:<user@dest.test>")
        balancer.close()
        return answers, banner, accepted

    answers, banner, accepted = run(attack())
    assert len(answers) == 20
    for answer in answers:
        assert answer.startswith(b"421 4.7.1"), answer
        assert b"220" not in answer
    assert banner.startswith(b"220")
    assert accepted.startswith(b"250")
    # (The harness's own readiness probe comes from outside proxy_sources too.)
    refusals = [item for item in rejected(server, "proxy_sources") if item["client"] in ATTACKERS]
    assert len(refusals) == 20
    assert {item["client"] for item in refusals} == set(ATTACKERS[:10])


def test_per_ip_limits_count_the_address_in_the_proxy_header(world: World) -> None:
    server = relay(world, PROXIED, {"max_connections_per_ip": 3})

    async def attack() -> tuple[list[bytes], list[bytes]]:
        # All through the balancer: one peer address, two client addresses.
        same = await asyncio.gather(*(Client.connect(server.port, BALANCER, preamble=proxy_v2("203.0.113.9"))
                                      for _ in range(8)))
        answers = await greetings(same)
        other = await asyncio.gather(*(Client.connect(server.port, BALANCER, preamble=proxy_v2("203.0.113.10"))
                                       for _ in range(3)))
        others = await greetings(other)
        close_all(same + other)
        return answers, others

    answers, others = run(attack())
    assert sum(a.startswith(b"220") for a in answers) == 3
    assert sum(a.startswith(b"421 4.7.0 Too many connections from your address") for a in answers) == 5
    assert all(a.startswith(b"220") for a in others)
    assert {item["client"] for item in rejected(server, "connections per address")} == {"203.0.113.9"}


def test_proxy_protocol_without_proxy_sources_is_a_configuration_error(tmp_path: Path) -> None:
    cases = {
        "listeners.0.proxy_sources: required when proxy_protocol is on":
            {"listeners": [{"name": "lb", "address": "127.0.0.1:2525", "proxy_protocol": True}]},
        "listeners.0.proxy_sources: set, but proxy_protocol is off":
            {"listeners": [{"name": "lb", "address": "127.0.0.1:2525", "proxy_sources": ["10.0.0.0/8"]}]},
        "limits.reserved_connections: must be below max_connections (10)":
            {"limits": {"max_connections": 10, "reserved_connections": 10}},
    }
    for expected, tree in cases.items():
        path = tmp_path / "mta.yaml"
        path.write_text(yaml.safe_dump({"hostname": "mta.kubemta.test", **tree}))
        with pytest.raises(ConfigError) as error:
            load(path, environ={})
        assert expected in str(error.value)


# -- 2. TLS handshakes ---------------------------------------------------------------------------------------------

def implicit_tls(world: World, limits: dict[str, Any], **config: Any) -> tuple[MtaServer, ssl.SSLContext]:
    ca = trustme.CA()
    directory = world.root / "tls"
    directory.mkdir(exist_ok=True)
    cert, key = write_cert(ca, directory)
    server = relay(world, {"mode": "submissions", "tls": {"cert_file": str(cert), "key_file": str(key)}}, limits,
                   **config)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return server, context


async def still_open(clients: list[Client], wait: float = 0.5) -> list[bool]:
    closed = await asyncio.gather(*(client.closed(wait) for client in clients))
    return [not item for item in closed]


def test_half_open_tls_handshakes_are_counted_capped_and_timed_out(world: World) -> None:
    limits = {"max_tls_handshakes": 20, "max_tls_handshakes_per_ip": 4, "tls_handshake_timeout": "2s",
              "max_connections": 200, "max_connections_per_ip": 50}
    server, context = implicit_tls(world, limits)
    baseline = open_fds(server)

    async def attack() -> dict[str, Any]:
        # 10 addresses x 8 connections that never start their handshake.
        clients = await connect_all(server.port, ATTACKERS[:10], 8)
        await asyncio.sleep(0.5)
        held = open_fds(server) - baseline
        kept = await still_open(clients)
        # While the attack holds every handshake slot, one more stranger is
        # turned away and a trusted client still gets through.
        stranger = await Client.connect(server.port, ATTACKERS[15])
        turned_away = await stranger.closed(1.0)
        stranger.close()
        legit = await Client.connect(server.port, TRUSTED, context=context)
        banner = await legit.reply()
        legit.close()
        started = time.monotonic()
        pending = [client for client, open_ in zip(clients, kept, strict=True) if open_]
        ended = await asyncio.gather(*(client.closed(6.0) for client in pending))
        gone = time.monotonic() - started
        close_all(clients)
        await asyncio.sleep(0.3)
        return {"held": held, "kept": kept, "turned_away": turned_away, "banner": banner, "ended": ended, "gone": gone,
                "after": open_fds(server) - baseline}

    seen = run(attack())
    # 80 connections: 4 per address (40) are over the cap in all (20); the rest are closed at once.
    assert sum(seen["kept"]) == 20
    assert seen["held"] <= 20 + 3, seen  # descriptors: the capped handshakes, and little else
    assert seen["turned_away"]
    assert seen["banner"].startswith(b"220")
    assert all(seen["ended"]) and seen["gone"] < 2.0 + 2.0, seen  # closed by the handshake timeout
    assert seen["after"] <= 2, seen
    assert len(rejected(server, "TLS handshake timeout")) == 20
    assert rejected(server, "TLS handshakes in progress")


def test_tls_handshakes_in_progress_count_against_max_connections(world: World) -> None:
    limits = {"max_connections": 12, "reserved_connections": 0, "max_connections_per_ip": 3,
              "max_tls_handshakes": 100, "max_tls_handshakes_per_ip": 100, "tls_handshake_timeout": "10s"}
    server, context = implicit_tls(world, limits)

    async def attack() -> tuple[list[bool], bytes, bytes]:
        clients = await connect_all(server.port, ATTACKERS[:8], 3)
        await asyncio.sleep(0.5)
        kept = await still_open(clients)
        full = await Client.connect(server.port, TRUSTED)
        refused = await full.reply(2.0)  # closed: no 421 can be read before TLS
        full.close()
        close_all(clients)
        await asyncio.sleep(0.5)
        legit = await Client.connect(server.port, TRUSTED, context=context)
        banner = await legit.reply()
        legit.close()
        return kept, refused, banner

    kept, refused, banner = run(attack())
    assert sum(kept) == 12  # 24 half-open handshakes, 12 slots
    assert refused == b""
    assert banner.startswith(b"220")
    assert len(rejected(server, "max_connections")) == 24 - 12 + 1


@pytest.mark.parametrize("workers", [0, 1])
def test_tls_handshakes_in_progress_show_in_metrics(world: World, workers: int) -> None:
    limits = {"max_tls_handshakes": 50, "max_tls_handshakes_per_ip": 10, "tls_handshake_timeout": "30s"}
    server, _ = implicit_tls(world, limits, workers=workers)

    async def attack() -> tuple[Scrape, Scrape]:
        clients = await connect_all(server.port, ATTACKERS[:3], 5)  # never start their handshake
        try:
            # Workers report every second; the main process's own count is current.
            during = await asyncio.to_thread(wait_for_sample, server, "kubemta_tls_handshakes_active", 15,
                                             listener="relay")
        finally:
            close_all(clients)
        deadline = time.monotonic() + 20
        after = await asyncio.to_thread(scrape, server)
        while after.get("kubemta_tls_handshakes_active", listener="relay") and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            after = await asyncio.to_thread(scrape, server)
        return during, after

    during, after = run(attack())
    assert during.get("kubemta_tls_handshakes_active", listener="relay") == 15
    assert during.get("kubemta_sessions_active", listener="relay") == 0  # no session before the handshake ends
    assert after.get("kubemta_tls_handshakes_active", listener="relay") == 0


# -- 3. slots, junk, idle and old sessions ------------------------------------------------------------------------

def test_slots_reserved_for_trusted_networks_survive_a_flood(world: World) -> None:
    server = relay(world, limits={"max_connections": 60, "reserved_connections": 10, "max_connections_per_ip": 5})
    baseline = open_fds(server)

    async def attack() -> tuple[list[bytes], int, list[bytes], bytes]:
        flood = await connect_all(server.port, ATTACKERS, 5)  # 20 addresses x 5 connections
        answers = await greetings(flood)
        await asyncio.sleep(0.5)  # the server closes a refused connection just after its 421
        held = open_fds(server) - baseline
        trusted = await connect_all(server.port, [TRUSTED], 5)
        banners = await greetings(trusted)
        await trusted[0].cmd(b"EHLO app.kubemta.test")
        await trusted[0].cmd(b"MAIL FROM:<app@sender.test>")
        accepted = await trusted[0].cmd(b"RCPT TO:<user@dest.test>")
        close_all(flood + trusted)
        return answers, held, banners, accepted

    answers, held, banners, accepted = run(attack())
    greeted = sum(a.startswith(b"220") for a in answers)
    assert greeted == 60 - 10  # the untrusted share
    assert sum(a.startswith(b"421 4.7.0 Too many connections,") for a in answers) == 100 - 50
    assert held <= 50 + 3, held
    assert all(b.startswith(b"220") for b in banners), banners  # the reserved slots
    assert accepted.startswith(b"250")
    assert len(rejected(server, "reserved for trusted networks")) == 50


def test_ehlo_keepalives_are_junk_after_the_first_few(world: World) -> None:
    server = relay(world, limits={"max_junk_commands": 5, "session_idle_timeout": "60s"})

    async def keepalive(source: str) -> list[bytes]:
        client = await Client.connect(server.port, source)
        await client.reply()
        answers = []
        for _ in range(20):  # bounded: the cut-off is due at the ninth
            answer = await client.cmd(b"EHLO app.kubemta.test")
            answers.append(answer)
            if not answer.startswith(b"250"):
                break
        client.close()
        return answers

    async def attack() -> list[list[bytes]]:
        return await asyncio.gather(*(keepalive(source) for source in ATTACKERS[:5]))

    for answers in run(attack()):
        assert len(answers) == 3 + 5 + 1
        assert all(a.startswith(b"250") for a in answers[:-1])
        assert answers[-1].startswith(b"421 4.7.0 Too many commands without mail")


def test_junk_count_starts_again_after_each_message(world: World) -> None:
    server = relay(world, limits={"max_junk_commands": 3})

    async def session() -> list[bytes]:
        client = await Client.connect(server.port)
        await client.reply()
        await client.cmd(b"EHLO app.kubemta.test")
        answers = []
        for n in range(3):
            answers += [await client.cmd(b"RSET"), await client.cmd(b"NOOP")]
            await client.cmd(b"MAIL FROM:<app@sender.test>")
            await client.cmd(b"RCPT TO:<user@dest.test>")
            await client.cmd(b"DATA")
            answers.append(await client.cmd(f"Subject: {n}\r\n\r\nhello\r\n.".encode()))
        client.close()
        return answers

    async def clients() -> list[list[bytes]]:
        return await asyncio.gather(*(session() for _ in range(3)))

    for answers in run(clients()):
        assert all(a.startswith(b"250") for a in answers), answers


def test_sessions_kept_alive_with_noop_end_at_the_idle_bound(world: World) -> None:
    server = relay(world, limits={"session_idle_timeout": "2s", "session_timeout": "30s", "max_junk_commands": 1000})

    async def noop_forever(source: str) -> tuple[bytes, float]:
        client = await Client.connect(server.port, source)
        await client.reply()
        await client.cmd(b"EHLO app.kubemta.test")
        started = time.monotonic()
        answer = b""
        for _ in range(40):  # 0.2 s apart: 8 s at most
            answer = await client.cmd(b"NOOP")
            if not answer.startswith(b"250"):
                break
            await asyncio.sleep(0.2)
        client.close()
        return answer, time.monotonic() - started

    async def attack() -> list[tuple[bytes, float]]:
        return await asyncio.gather(*(noop_forever(source) for source in ATTACKERS[:6]))

    for answer, elapsed in run(attack()):
        assert answer.startswith(b"421 4.4.2 Idle"), answer
        assert 1.5 < elapsed < 4.0, elapsed
    assert len(rejected(server, "idle timeout")) == 6


def test_old_sessions_end_after_their_lifetime_but_a_data_transfer_finishes(world: World) -> None:
    server = relay(world, limits={"session_lifetime": "2s", "session_idle_timeout": "60s"})

    async def sending() -> tuple[list[bytes], float]:
        client = await Client.connect(server.port)
        started = time.monotonic()
        await client.reply()
        await client.cmd(b"EHLO app.kubemta.test")
        answers = []
        for n in range(2):
            await client.cmd(b"MAIL FROM:<app@sender.test>")
            await client.cmd(b"RCPT TO:<user@dest.test>")
            await client.cmd(b"DATA")
            client.writer.write(f"Subject: {n}\r\n\r\n".encode())
            if n == 1:  # still sending when the lifetime ends
                await asyncio.sleep(started + 2.5 - time.monotonic())
            answers.append(await client.cmd(b"hello\r\n."))
        answers.append(await client.reply(2.0))
        client.close()
        return answers, time.monotonic() - started

    async def waiting() -> tuple[list[bytes], float]:
        client = await Client.connect(server.port)
        started = time.monotonic()
        await client.reply()
        await client.cmd(b"EHLO app.kubemta.test")
        answer = await client.reply(5.0)  # sends nothing more: the server speaks first
        client.close()
        return [answer], time.monotonic() - started

    async def clients() -> list[tuple[list[bytes], float]]:
        return await asyncio.gather(*(sending() for _ in range(3)), *(waiting() for _ in range(3)))

    seen = run(clients())
    for answers, elapsed in seen[:3]:
        assert [a[:20] for a in answers[:2]] == [b"250 2.0.0 Ok: queued"] * 2, answers  # the slow one too
        assert answers[2].startswith(b"421 4.4.2 Session open for too long"), answers
        assert 2.4 < elapsed < 4.0, elapsed
    for answers, elapsed in seen[3:]:
        assert answers[0].startswith(b"421 4.4.2 Session open for too long"), answers
        assert 1.8 < elapsed < 3.0, elapsed
    assert len(rejected(server, "session lifetime")) == 6


def test_half_sent_requests_on_the_health_port_are_timed_out(world: World) -> None:
    server = relay(world)
    http = int(server.config["http"]["address"].rsplit(":", 1)[1])
    baseline = open_fds(server)

    async def attack() -> tuple[int, list[bool], float]:
        clients = await asyncio.gather(*(Client.connect(http, source, preamble=b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                                         for source in ATTACKERS[:10] for _ in range(3)))
        await asyncio.sleep(0.5)
        held = open_fds(server) - baseline
        started = time.monotonic()
        ended = await asyncio.gather(*(client.closed(15.0) for client in clients))
        close_all(clients)
        return held, ended, time.monotonic() - started

    held, ended, elapsed = run(attack())
    assert held >= 25  # they were open: the server waited for the rest of the header
    assert all(ended) and elapsed < 10.0 + 2.0, elapsed
    with urllib.request.urlopen(f"http://{HOST}:{http}/healthz", timeout=5) as response:
        assert response.status == 200


def test_half_sent_handoff_requests_are_timed_out() -> None:
    async def attack() -> tuple[list[bool], list[bytes], float]:
        port = free_port()
        secret = b"s" * 32
        receiver = HandoffServer(HOST, port, secret, cast(Intake, None), set(), 1024, lambda: False,
                                 pod_name="mta-0", header_timeout=1.0, body_timeout=1.0)
        await receiver.start()
        try:
            heads = await asyncio.gather(*(Client.connect(port, source, preamble=b"POST /handoff HTTP/1.1\r\n")
                                           for source in ATTACKERS[:10]))
            def signed() -> bytes:  # signed (a nonce each), so the endpoint reads the body: which never comes whole
                fields = "".join(f"{k}: {v}\r\n" for k, v in wire.sign(secret, b"x" * 1000, "mta-0").items())
                return f"POST /v1/handoff HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n{fields}\r\nabc".encode()

            bodies = await asyncio.gather(*(Client.connect(port, source, preamble=signed())
                                            for source in ATTACKERS[:10]))
            started = time.monotonic()
            ended = await asyncio.gather(*(client.closed(5.0) for client in heads))
            answers = await asyncio.gather(*(client.reader.readline() for client in bodies))
            elapsed = time.monotonic() - started
            close_all(heads + bodies)
            return ended, answers, elapsed
        finally:
            await receiver.stop()

    ended, answers, elapsed = run(attack())
    assert all(ended)
    assert all(a.startswith(b"HTTP/1.1 408") for a in answers), answers
    assert elapsed < 1.0 + 2.0


# -- 4. shutdown ------------------------------------------------------------------------------------------------------

def test_at_shutdown_idle_sessions_get_421_and_transactions_finish(world: World) -> None:
    server = relay(world, shutdown={"timeout": "4s"})

    async def scene() -> dict[str, Any]:
        idle = await connect_all(server.port, [TRUSTED], 5)
        await greetings(idle)
        for client in idle:
            await client.cmd(b"EHLO app.kubemta.test")
        busy = await connect_all(server.port, [TRUSTED], 3)
        await greetings(busy)
        for client in busy:
            await client.cmd(b"EHLO app.kubemta.test")
            await client.cmd(b"MAIL FROM:<app@sender.test>")
            await client.cmd(b"RCPT TO:<user@dest.test>")
            await client.cmd(b"DATA")
            client.writer.write(b"Subject: in flight\r\n\r\nfirst half\r\n")
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        told = await asyncio.gather(*(client.reply(3.0) for client in idle))
        await asyncio.sleep(0.5)
        finishers, stuck = busy[:2], busy[2]
        done = await asyncio.gather(*(client.cmd(b"second half\r\n.") for client in finishers))
        after = await asyncio.gather(*(client.reply(3.0) for client in finishers))
        started = time.monotonic()
        cut = await stuck.reply(6.0)
        waited = time.monotonic() - started
        close_all(idle + busy)
        return {"told": told, "done": done, "after": after, "cut": cut, "waited": waited}

    seen = run(scene())
    for answer in seen["told"]:
        assert answer.startswith(b"421 4.3.2 Service shutting down"), answer
    for answer in seen["done"]:
        assert answer.startswith(b"250 2.0.0 Ok: queued"), answer
    for answer in seen["after"]:
        assert answer.startswith(b"421 4.3.2"), answer
    assert seen["cut"].startswith(b"421 4.3.2"), seen["cut"]  # at the deadline, mid-transaction
    assert seen["waited"] < 4.0 + 1.0
    assert server.proc is not None and server.proc.wait(timeout=15) == 0
    assert len(server.queue_list()) == 2
