"""The content policy at DATA, through a real ``mta serve`` and smtplib.

Each message goes to a receiver that records the raw bytes (``Recorder``),
so the tests see what was repaired, what was refused with which reply, and
what was removed before delivery.
"""

from __future__ import annotations

import smtplib
from collections.abc import Iterator

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
