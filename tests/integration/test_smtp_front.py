"""The SMTP front end as a client sees it: extensions, codes, relay policy, errors.

What only the session decides runs against the listeners in process
(``front``, tests.session); what needs delivery or the server's log runs
against a real ``mta serve`` (``world``).
"""

from __future__ import annotations

import smtplib
import socket
import subprocess

import pytest

from tests.conftest import Fronts, World
from tests.obs.logs import events
from tests.peers.net import free_port


def connect(server) -> smtplib.SMTP:  # type: ignore[no-untyped-def]
    client = smtplib.SMTP("127.0.0.1", server.port, timeout=10)
    client.ehlo("client.kubemta.test")
    return client


def test_ehlo_advertises_the_promised_extensions(front: Fronts) -> None:
    server = front()
    with connect(server) as client:
        for ext in ("size", "8bitmime", "pipelining", "enhancedstatuscodes", "smtputf8"):
            assert client.has_extn(ext), ext
        assert client.esmtp_features["size"] == str(25 * 1024 * 1024)


@pytest.mark.parametrize(
    ("commands", "expected"),
    [
        (["FOO bar"], (500, "5.5.2")),
        (["RCPT TO:<a@dest.test>"], (503, "5.5.1")),
        (["MAIL FROM:<a@sender.test>", "DATA"], (503, "5.5.1")),
        (["MAIL FROM:<not an address>"], (501, "5.1.7")),
        (["MAIL FROM:<a@sender.test>", "RCPT TO:<no-domain>"], (501, "5.1.3")),
        (["MAIL FROM:<a@sender.test>", "RCPT TO:<a@bad_domain.test>"], (501, "5.1.3")),
        (["MAIL FROM:<a@sender.test>", "RCPT TO:<<<>"], (501, "5.1.3")),
        (["MAIL FROM:<a@sender.test> SIZE=999999999999"], (552, "5.3.4")),
        (["MAIL FROM:<a@sender.test> FOO=bar"], (555, "5.5.4")),
        (["NOOP"], (250, "2.0.0")),
        (["RSET"], (250, "2.0.0")),
        (["VRFY postmaster@dest.test"], (252, "2.0.0")),
    ],
    ids=[
        "unknown-command",
        "rcpt-before-mail",
        "data-before-rcpt",
        "bad-sender",
        "rcpt-without-domain",
        "rcpt-bad-domain",
        "rcpt-garbage",
        "size-too-big",
        "unknown-parameter",
        "noop",
        "rset",
        "vrfy",
    ],
)
def test_every_reply_has_an_enhanced_code(front: Fronts, commands: list[str], expected: tuple[int, str]) -> None:
    server = front()
    with connect(server) as client:
        for command in commands:
            code, text = client.docmd(command)
        assert (code, text.decode().split()[0]) == expected
    assert server.queued() == []


def test_untrusted_client_cannot_relay(world: World) -> None:
    server = world.mta(
        {
            "listeners": [
                {"name": "relay", "address": "127.0.0.1:{port}", "mode": "relay", "trusted_networks": ["192.0.2.0/24"]}
            ]
        }
    )
    sink = world.sink("dest")
    with connect(server) as client:
        assert client.docmd("MAIL FROM:<a@sender.test>")[0] == 250
        code, text = client.docmd("RCPT TO:<victim@dest.test>")
        assert (code, text) == (554, b"5.7.1 Relay access denied")
        assert client.docmd("DATA")[0] == 503
    assert server.queue_list() == []
    assert sink.messages() == []
    assert events(server, "rejected")


def test_submission_listener_applies_its_own_trusted_networks(front: Fronts) -> None:
    sub_port = free_port()
    server = front(
        {
            "listeners": [
                {"name": "relay", "address": "127.0.0.1:{port}", "mode": "relay", "trusted_networks": ["127.0.0.0/8"]},
                {
                    "name": "submission",
                    "address": f"127.0.0.1:{sub_port}",
                    "mode": "submission",
                    "trusted_networks": ["198.51.100.0/24"],
                },
            ]
        }
    )
    with smtplib.SMTP("127.0.0.1", sub_port, timeout=10) as client:
        client.ehlo("x.kubemta.test")
        client.docmd("MAIL FROM:<a@sender.test>")
        assert client.docmd("RCPT TO:<b@dest.test>")[0] == 554
    with connect(server) as client:
        client.docmd("MAIL FROM:<a@sender.test>")
        assert client.docmd("RCPT TO:<b@dest.test>")[0] == 250


def test_swaks_session_is_queued_with_a_queue_id(world: World) -> None:
    server = world.mta()
    sink = world.sink("dest")
    done = subprocess.run(
        [
            "swaks",
            "--server",
            f"127.0.0.1:{server.port}",
            "--from",
            "app@sender.test",
            "--to",
            "user@dest.test",
            "--helo",
            "app.kubemta.test",
            "--header",
            "Subject: swaks",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "<-  250 2.0.0 Ok: queued as " in done.stdout
    queue_id = done.stdout.split("queued as ")[1].split()[0]
    [message] = sink.wait_for_messages(1, timeout=20)
    assert message.sender == "app@sender.test" and message.recipients == ["user@dest.test"]
    assert f"id {queue_id}".encode() in message.data
    server.wait_queue_empty()
    assert queue_id in server.log()


def test_client_that_vanishes_in_data_leaves_nothing(front: Fronts) -> None:
    server = front()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    reader = sock.makefile("rb")
    reader.readline()
    for line in (b"EHLO x.kubemta.test", b"MAIL FROM:<a@sender.test>", b"RCPT TO:<b@dest.test>", b"DATA"):
        sock.sendall(line + b"\r\n")
        while True:
            reply = reader.readline()
            if reply[3:4] != b"-":
                break
    sock.sendall(b"Subject: half\r\n\r\nonly part of it")
    reader.close()  # the socket's file object holds the connection open too
    sock.close()
    server.wait_idle()  # the session has seen the close: a message it stored would be on disk now
    assert server.queued() == []
    assert list((server.spool_dir / "msg").iterdir()) == []
