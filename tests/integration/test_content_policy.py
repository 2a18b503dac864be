"""The content policy at DATA, through a real ``mta serve`` and smtplib.

Each message goes to a receiver that records the raw bytes (``Recorder``),
so the tests see what was repaired, what was refused with which reply, and
what was removed before delivery.
"""

from __future__ import annotations

import email
import email.policy
import smtplib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import World
from tests.harness import MtaServer
from tests.peers.recorder import Received, Recorder

SENDER = "app@sender.test"


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    with Recorder() as peer:
        yield peer


def serve(world: World, recorder: Recorder, limits: dict[str, object] | None = None) -> MtaServer:
    return world.mta({"delivery": {"port": recorder.port}, "limits": limits or {}})


def submit(server: MtaServer, name: str, data: bytes) -> tuple[int, str]:
    """DATA's reply for one message to ``name@[127.0.0.1]`` (the recorder)."""
    with smtplib.SMTP("127.0.0.1", server.port, timeout=60) as client:
        client.ehlo("app.kubemta.test")
        client.mail(SENDER)
        code, text = client.rcpt(f"{name}@[127.0.0.1]")
        assert code == 250, text
        code, reply = client.data(data)
        return code, reply.decode()


def delivered(recorder: Recorder, count: int) -> dict[str, Received]:
    return {m.rcpt_tos[0].split("@")[0]: m for m in recorder.wait_for(count, timeout=60)}


def test_forged_authentication_results_in_every_form_are_removed(world: World, recorder: Recorder) -> None:
    server = serve(world, recorder)  # authserv-id: the hostname, mta.kubemta.test
    forms = {
        "plain": b"Authentication-Results: mta.kubemta.test; auth=pass smtp.auth=ceo",
        "mixed-case-name": b"AuThEnTiCaTiOn-ReSuLtS: mta.kubemta.test; auth=pass smtp.auth=ceo",
        "leading-comment": b"Authentication-Results: (trust me) mta.kubemta.test; auth=pass smtp.auth=ceo",
        "quoted-id": b'Authentication-Results: "MTA.kubemta.test"; auth=pass smtp.auth=ceo',
    }
    for name, field in forms.items():
        code, text = submit(server, name, field + b"\r\nFrom: <app@sender.test>\r\nSubject: forged\r\n\r\nhi\r\n")
        assert code == 250, text
    arrived = delivered(recorder, len(forms))
    for name in forms:
        assert b"smtp.auth=ceo" not in arrived[name].data, name


def test_a_missing_separator_and_a_space_before_the_colon_are_repaired(world: World, recorder: Recorder) -> None:
    server = serve(world, recorder)
    # CPython's corpus msg_35 (a body line right after the header) and a legacy app's header.
    separator = b"From: aperson@dom.ain\r\nSubject: here's something\r\ncounter to RFC 2822, no blank line\r\n"
    legacy = b"From: <app@sender.test>\r\nX-Legacy : value\r\nSubject: legacy\r\n\r\nbody\r\n"
    for name, data in (("separator", separator), ("legacy", legacy)):
        code, text = submit(server, name, data)
        assert code == 250, text
    arrived = delivered(recorder, 2)
    header, _, body = arrived["separator"].data.partition(b"\r\n\r\n")
    assert b"\r\nSubject: here's something\r\n" in header and body == b"counter to RFC 2822, no blank line\r\n"
    assert b"\r\nX-Legacy: value\r\n" in arrived["legacy"].data
    server.wait_queue_empty(timeout=30)  # delivered, nothing bounced or left for retry
    assert '"event":"bounced"' not in server.log()


def test_a_header_that_cannot_be_represented_is_refused_at_data(world: World, recorder: Recorder) -> None:
    server = serve(world, recorder)
    unfoldable = b"From: <app@sender.test>\r\nX-Blob: " + b"x" * 1200 + b"\r\nSubject: s\r\n\r\nbody\r\n"
    code, text = submit(server, "blob", unfoldable)
    assert (code, text[:5]) == (550, "5.6.0"), text
    # One that has white space to fold at is folded, and delivered.
    foldable = b"From: <app@sender.test>\r\nX-Terms: " + b"word " * 300 + b"\r\nSubject: s\r\n\r\nbody\r\n"
    code, text = submit(server, "words", foldable)
    assert code == 250, text
    data = delivered(recorder, 1)["words"].data
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    assert b"\r\nX-Terms: " + b"word " * 300 + b"\r\n" in data.replace(b"\r\n ", b" ")  # unfolds to what came
    server.wait_queue_empty(timeout=30)


def received_fields(count: int) -> bytes:
    return b"".join(b"Received: from hop%d.example by hop%d.example; Mon, 1 Jan 2024 00:00:00 +0000\r\n" % (i, i + 1)
                    for i in range(count))


def test_a_mail_loop_is_refused_past_max_hops(world: World, recorder: Recorder) -> None:
    server = serve(world, recorder, {"max_hops": 10})
    body = b"From: <app@sender.test>\r\nSubject: loop\r\n\r\nround and round\r\n"
    code, text = submit(server, "loop", received_fields(10) + body)
    assert (code, text[:5]) == (554, "5.4.6"), text
    code, text = submit(server, "fine", received_fields(9) + body)  # ours makes ten
    assert code == 250, text
    assert list(delivered(recorder, 1)) == ["fine"]


def test_the_default_hop_limit_is_50(world: World, recorder: Recorder) -> None:
    server = serve(world, recorder)
    code, text = submit(server, "loop", received_fields(50) + b"Subject: loop\r\n\r\nx\r\n")
    assert (code, text[:5]) == (554, "5.4.6"), text


VERIFIER = Path(__file__).parent.parent / "tools" / "dkimverify.pl"


def signing_config(world: World) -> dict[str, object]:
    key_path = world.dkim_key("long", "sender.test")
    return {"keys": [{"domain": "sender.test", "selector": "long", "key_file": str(key_path)}]}


def test_long_lines_are_accepted_and_delivered_legal_and_signed(world: World, recorder: Recorder) -> None:
    server = world.mta({"delivery": {"port": recorder.port}, "dkim": signing_config(world)})
    html = "<html><body>" + "<td>legacy report cell</td>" * 4000 + "</body></html>"  # one line, ~100 KB
    assert len(html) > 100_000
    header = "From: App <app@sender.test>\r\nSubject: report\r\nMIME-Version: 1.0\r\nContent-Type: text/html\r\n"
    messages = {"crlf": (header + "\r\n" + html + "\r\n").encode(),
                "bare-lf": (header + "\r\n" + html + "\r\n").replace("\r\n", "\n").encode()}
    for name, data in messages.items():
        code, text = submit(server, name, data)
        assert code == 250, text
    arrived = delivered(recorder, len(messages))
    for name in messages:
        data = arrived[name].data
        assert max(len(line) for line in data.split(b"\r\n")) <= 998, name
        verdict = subprocess.run(["perl", str(VERIFIER), world.dns.host, str(world.dns.port)], input=data,
                                 capture_output=True, timeout=30, check=False).stdout.decode()
        assert "rsa-sha256 pass sender.test long" in verdict, (name, verdict)
        part = email.message_from_bytes(data, policy=email.policy.default)
        assert part["Content-Transfer-Encoding"] == "quoted-printable"
        assert part.get_content().strip() == html


def test_a_line_beyond_max_line_length_is_refused(world: World, recorder: Recorder) -> None:
    server = serve(world, recorder, {"max_line_length": 2000})
    code, text = submit(server, "long", b"Subject: s\r\n\r\n" + b"y" * 1990 + b"\r\n")
    assert code == 250, text
    code, text = submit(server, "longer", b"Subject: s\r\n\r\n" + b"y" * 2001 + b"\r\n")
    assert (code, text[:5]) == (500, "5.5.2"), text
