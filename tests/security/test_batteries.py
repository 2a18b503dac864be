"""Table-driven attack batteries over raw sockets: open relay, SMTP smuggling,
envelope injection, resource limits and PROXY protocol."""

from __future__ import annotations

import socket
import struct
import time

import pytest

from tests.conftest import Fronts, World
from tests.security.conftest import PASSWORD, Secure, make_secure
from tests.session import SessionServer


class Raw:
    """A plain socket SMTP client: send exact bytes, read whole replies."""

    def __init__(self, port: int, *, greet: bool = True, preamble: bytes = b"") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if preamble:
            self.sock.sendall(preamble)
        self.reader = self.sock.makefile("rb")
        self.greeting = self.reply() if greet else b""

    def reply(self) -> bytes:
        lines = []
        while True:
            line = self.reader.readline()
            if not line:
                raise ConnectionError("closed: " + repr(b"".join(lines)))
            lines.append(line)
            if line[3:4] != b"-":
                return b"".join(lines)

    def cmd(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def close(self) -> None:
        # The file object holds the socket open too.
        self.reader.close()
        self.sock.close()


# -- open relay ------------------------------------------------------------

RELAY_TESTS = {
    "plain": "user@dest.test",
    "percent-hack": "user%dest.test@mta.kubemta.test",
    "percent-hack-literal": "user%dest.test@[127.0.0.1]",
    "quoted-local-part": '"user@dest.test"@mta.kubemta.test',
    "quoted-percent": '"user%dest.test"@mta.kubemta.test',
    "bang-path": "dest.test!user",
    "bang-path-at-us": "dest.test!user@mta.kubemta.test",
    "source-route": "@mta.kubemta.test:user@dest.test",
    "double-at": "user@dest.test@mta.kubemta.test",
    "address-literal": "user@[127.0.0.2]",
    "uppercase-domain": "user@DEST.TEST",
    "trailing-dot": "user@dest.test.",
    "postmaster-elsewhere": "postmaster@dest.test",
    "ipv6-literal": "user@[IPv6:::1]",
    "local-unqualified": "user",
}


@pytest.fixture(scope="module")
def relay_world(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    import shutil
    import uuid
    from pathlib import Path

    from tests.conftest import World as W

    root = Path("/var/tmp/kubemta-tests") / f"relay-{uuid.uuid4().hex[:8]}"
    root.mkdir(parents=True, mode=0o755)
    world = W(root)
    try:
        world.start()
        yield make_secure(world)
    finally:
        world.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("listener", ["relay", "submission", "legacy"])
@pytest.mark.parametrize("rcpt", list(RELAY_TESTS.values()), ids=list(RELAY_TESTS))
def test_open_relay_battery_gets_no_2xx(relay_world: Secure, listener: str, rcpt: str) -> None:
    port = {"relay": relay_world.relay, "submission": relay_world.submission, "legacy": relay_world.legacy}[listener]
    client = Raw(port)
    try:
        client.cmd(b"EHLO attacker.example")
        assert client.cmd(b"MAIL FROM:<spammer@evil.example>")[:3] in (b"250", b"553")
        reply = client.cmd(b"RCPT TO:<" + rcpt.encode() + b">")
        assert not reply.startswith(b"2"), reply
        assert reply[:1] in (b"4", b"5")
    finally:
        client.close()


def test_authenticated_routing_domain_is_the_parsed_domain(world: World) -> None:
    secure = make_secure(world)
    amx, dest = world.sink("amx"), world.sink("dest")
    with secure.client(secure.submission, tls=True) as client:
        client.login("app", PASSWORD)
        client.sendmail("app@sender.test", ["user%dest.test@amx.test"], b"Subject: percent\r\n\r\nx\r\n")
    [message] = amx.wait_for_messages(1, timeout=20)
    assert message.recipients == ["user%dest.test@amx.test"]
    secure.server.wait_queue_empty()
    assert dest.messages() == []


# -- SMTP smuggling ------------------------------------------------------------

SMUGGLING = {
    "lf-dot-lf": b"\n.\n",
    "cr-dot-cr": b"\r.\r",
    "cr-dot-lf": b"\r.\n",
    "lf-dot-cr": b"\n.\r",
    "lf-dot-crlf": b"\n.\r\n",
    "crlf-dot-lf": b"\r\n.\n",
    "cr-dot-crlf": b"\r.\r\n",
    "crlf-dot-cr": b"\r\n.\r",
    "crlf-nul-dot-crlf": b"\r\n\x00.\r\n",
    "crlf-dot-cr-crlf": b"\r\n.\r\r\n",
}
SMUGGLED = b"MAIL FROM:<ceo@sender.test>\r\nRCPT TO:<victim@amx.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nevil\r\n"


@pytest.fixture(scope="module")
def smuggling_world():  # type: ignore[no-untyped-def]
    import shutil
    import uuid
    from pathlib import Path

    root = Path("/var/tmp/kubemta-tests") / f"smuggle-{uuid.uuid4().hex[:8]}"
    root.mkdir(parents=True, mode=0o755)
    world = World(root)
    try:
        world.start()
        dest, amx = world.sink("dest"), world.sink("amx")
        server = world.mta({"listeners": [{"name": "relay", "address": "127.0.0.1:{port}", "mode": "relay",
                                           "trusted_networks": ["127.0.0.0/8"]}]})
        strict = world.mta({"listeners": [{"name": "relay", "address": "127.0.0.1:{port}", "mode": "relay",
                                           "trusted_networks": ["127.0.0.0/8"]}],
                            "limits": {"bare_line_endings": "reject"}}, name="strict")
        yield world, server, strict, dest, amx
    finally:
        world.close()
        shutil.rmtree(root, ignore_errors=True)


def _transaction(port: int, sequence: bytes, subject: bytes) -> list[bytes]:
    client = Raw(port)
    try:
        client.cmd(b"EHLO app.kubemta.test")
        client.cmd(b"MAIL FROM:<app@sender.test>")
        client.cmd(b"RCPT TO:<user@dest.test>")
        assert client.cmd(b"DATA").startswith(b"354")
        client.sock.sendall(b"Subject: " + subject + b"\r\n\r\nhello" + sequence + SMUGGLED + b"\r\n.\r\n")
        replies = [client.reply()]
        client.sock.sendall(b"QUIT\r\n")
        replies.append(client.reply())
        return replies
    finally:
        client.close()


@pytest.mark.parametrize("sequence", list(SMUGGLING.values()), ids=list(SMUGGLING))
def test_smuggling_sequence_does_not_end_data(smuggling_world, sequence: bytes) -> None:  # type: ignore[no-untyped-def]
    _, server, _, dest, amx = smuggling_world
    subject = b"case-" + sequence.hex().encode()
    replies = _transaction(server.port, sequence, subject)
    assert replies[0].startswith(b"250 2.0.0 Ok: queued as"), replies
    assert replies[1].startswith(b"221"), replies  # nothing smuggled was answered in between
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any(subject in m.data for m in dest.messages()):
        time.sleep(0.1)
    [message] = [m for m in dest.messages() if subject in m.data]
    assert message.recipients == ["user@dest.test"]
    assert b"ceo@sender.test" in message.data  # the would-be command is plain body text
    # No message of its own came out of the smuggled text, here or at the victim's MX.
    assert all(b"Subject: case-" in m.data for m in dest.messages())
    assert amx.messages() == []


@pytest.mark.parametrize("sequence", [s for s in SMUGGLING.values() if s != b"\r\n\x00.\r\n"],
                         ids=[k for k, s in SMUGGLING.items() if s != b"\r\n\x00.\r\n"])
def test_bare_line_endings_can_be_rejected(smuggling_world, sequence: bytes) -> None:  # type: ignore[no-untyped-def]
    _, _, strict, _, _ = smuggling_world
    replies = _transaction(strict.port, sequence, b"strict-" + sequence.hex().encode())
    assert replies[0].startswith(b"550 5.6.0"), replies
    assert strict.queue_list() == []


def test_stored_message_has_only_crlf_line_endings(front: Fronts) -> None:
    server = front()  # listeners only: the message stays in the spool
    replies = _transaction(server.port, b"\n.\n", b"stored")
    assert replies[0].startswith(b"250")
    [msg_file] = list((server.spool_dir / "msg").iterdir())
    data = msg_file.read_bytes()
    assert b"\r\n.\r\n" in data  # the bare-LF dot line, now a proper line: dot-stuffed when sent
    assert data.replace(b"\r\n", b"").count(b"\n") == 0 and data.replace(b"\r\n", b"").count(b"\r") == 0


@pytest.mark.parametrize(("line", "code"), [
    (b"MAIL FROM:<a\rb@sender.test>", b"501"),
    (b"MAIL FROM:<a\x00b@sender.test>", b"501"),
    (b"MAIL FROM:<ab@send\ter.test>", b"501"),
    (b"RCPT TO:<victim\r@dest.test>", b"501"),
    (b"RCPT TO:<victim\x00@dest.test>", b"501"),
    (b"RCPT TO:<victim@dest.test\rX>", b"501"),
    (b"MAIL FROM:<a@sender.test\rX>", b"501"),
], ids=["mail-cr", "mail-nul", "mail-tab", "rcpt-cr", "rcpt-nul", "rcpt-domain-cr", "mail-domain-cr"])
def test_control_characters_in_envelope_addresses_are_501(front: Fronts, line: bytes, code: bytes) -> None:
    server = front()
    client = Raw(server.port)
    try:
        client.cmd(b"EHLO app.kubemta.test")
        if line.startswith(b"RCPT"):
            assert client.cmd(b"MAIL FROM:<app@sender.test>").startswith(b"250")
        reply = client.cmd(line)
        assert reply[:3] == code, reply
        assert reply[4:5] == b"5"
    finally:
        client.close()


# -- limits ------------------------------------------------------------------------

LIMITS = {"limits": {"max_connections_per_ip": 3, "max_errors": 3, "max_junk_commands": 5,
                     "max_recipients": 100, "max_message_size": "64K", "session_timeout": "2s",
                     "data_timeout": "2s", "max_line_length": 1000}}


@pytest.fixture
def limited(front: Fronts) -> SessionServer:
    return front(LIMITS)


def test_long_command_line_is_refused(limited: SessionServer) -> None:
    client = Raw(limited.port)
    client.cmd(b"EHLO app.kubemta.test")
    assert client.cmd(b"NOOP " + b"x" * 600)[:3] == b"500"
    client.close()


def test_oversize_and_overlong_data_is_refused_after_the_dot_and_nothing_inside_runs(limited: SessionServer) -> None:
    for body, code in (((b"y" * 998 + b"\r\n") * 70, b"552"), (b"z" * 1200 + b"\r\n", b"500")):
        client = Raw(limited.port)
        client.cmd(b"EHLO app.kubemta.test")
        client.cmd(b"MAIL FROM:<app@sender.test>")
        client.cmd(b"RCPT TO:<user@dest.test>")
        client.cmd(b"DATA")
        # Commands hidden after the overflow must stay data.
        client.sock.sendall(body + b"RSET\r\nMAIL FROM:<evil@sender.test>\r\n.\r\n")
        assert client.reply()[:3] == code
        assert client.cmd(b"NOOP")[:3] == b"250"
        client.close()
    assert limited.queued() == []


def test_recipients_beyond_the_limit_get_452(limited: SessionServer) -> None:
    client = Raw(limited.port)
    client.cmd(b"EHLO app.kubemta.test")
    client.cmd(b"MAIL FROM:<app@sender.test>")
    for n in range(100):
        assert client.cmd(f"RCPT TO:<u{n}@dest.test>".encode())[:3] == b"250"
    assert client.cmd(b"RCPT TO:<u100@dest.test>")[:9] == b"452 4.5.3"
    client.close()


def test_connections_per_address_are_limited(limited: SessionServer) -> None:
    held = [Raw(limited.port) for _ in range(3)]
    try:
        extra = socket.create_connection(("127.0.0.1", limited.port), timeout=10)
        assert extra.recv(200).startswith(b"421 4.7.0")
        extra.close()
    finally:
        for client in held:
            client.close()
    time.sleep(0.3)
    again = Raw(limited.port)
    assert again.greeting.startswith(b"220")
    again.close()


def test_error_budget_closes_the_session(limited: SessionServer) -> None:
    client = Raw(limited.port)
    client.cmd(b"EHLO app.kubemta.test")
    client.cmd(b"MAIL FROM:<broken")
    client.cmd(b"RCPT TO:<x@dest.test>")
    reply = client.cmd(b"MAIL FROM:<still broken")
    assert b"421 4.7.0 Too many errors" in reply + client.reader.readline()
    assert client.reader.readline() == b""
    client.close()


def test_junk_command_flood_is_cut_off(limited: SessionServer) -> None:
    client = Raw(limited.port)
    client.cmd(b"EHLO app.kubemta.test")
    for _ in range(5):
        assert client.cmd(b"NOOP")[:3] == b"250"
    assert client.cmd(b"NOOP")[:9] == b"421 4.7.0"
    client.close()


def test_idle_and_trickling_clients_are_timed_out(limited: SessionServer) -> None:
    idle = Raw(limited.port)
    start = time.monotonic()
    assert idle.reader.readline() == b""  # closed by the server
    assert time.monotonic() - start < 10
    idle.close()
    slow = Raw(limited.port)
    slow.cmd(b"EHLO app.kubemta.test")
    slow.cmd(b"MAIL FROM:<app@sender.test>")
    slow.cmd(b"RCPT TO:<user@dest.test>")
    slow.cmd(b"DATA")
    start = time.monotonic()
    closed = False
    for _ in range(50):  # one byte every 0.2 s never finishes within data_timeout
        try:
            slow.sock.sendall(b"x")
        except OSError:
            closed = True
            break
        time.sleep(0.2)
        if time.monotonic() - start > 4:
            slow.sock.settimeout(0.5)
            try:
                closed = slow.sock.recv(100) == b""
            except OSError:
                closed = True
            break
    assert closed
    slow.close()
    assert limited.queued() == []


# -- PROXY protocol v2 ------------------------------------------------------------------

def proxy_v2(src: str, dst: str = "127.0.0.1", sport: int = 40000, dport: int = 25) -> bytes:
    body = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


def test_proxy_protocol_client_address_decides_relay(world: World) -> None:
    server = world.mta({"listeners": [{"name": "lb", "address": "127.0.0.1:{port}", "mode": "relay",
                                       "trusted_networks": ["198.51.100.0/24"], "proxy_protocol": True,
                                       "proxy_sources": ["127.0.0.0/8"]}]})
    inside = Raw(server.port, preamble=proxy_v2("198.51.100.7"))
    inside.cmd(b"EHLO app.kubemta.test")
    inside.cmd(b"MAIL FROM:<app@sender.test>")
    assert inside.cmd(b"RCPT TO:<user@dest.test>")[:3] == b"250"
    inside.close()
    outside = Raw(server.port, preamble=proxy_v2("203.0.113.9"))
    outside.cmd(b"EHLO app.kubemta.test")
    outside.cmd(b"MAIL FROM:<app@sender.test>")
    assert outside.cmd(b"RCPT TO:<user@dest.test>")[:9] == b"554 5.7.1"
    outside.close()
    bare = socket.create_connection(("127.0.0.1", server.port), timeout=15)
    bare.sendall(b"EHLO no-proxy-header\r\n")
    assert bare.recv(100) == b""  # no PROXY header: closed without a greeting
    bare.close()
    assert "203.0.113.9" in server.log()  # logged as the client, not the balancer
