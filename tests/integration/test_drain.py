"""Scale-down drain: two real ``mta serve`` pods, a tempfailing MX, a fake Kubernetes API.

``mta-0`` and ``mta-1`` run as the pods of StatefulSet ``mta`` in namespace
``mail``, each with its own spool, both reading the StatefulSet from the
fake API server (tests.fakes.kube_api) through the real ``kubernetes``
client.  Mail queued on ``mta-1`` must end up in ``mta-0``'s spool with its
per-recipient state, attempts, next attempt and expiry intact when the API
says replicas=1 and ``mta-1`` gets SIGTERM, and must then be delivered
exactly once when the MX recovers.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import select
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from mta.drain import wire
from spool import Recipient, Record
from spool.ids import new_id
from tests.conftest import World
from tests.fakes.kube_api import FakeKubeApi
from tests.harness import MtaServer, send_mail
from tests.obs.logs import events
from tests.peers.net import free_port

NS = "mail"


@pytest.fixture
def kube() -> Iterator[FakeKubeApi]:
    with FakeKubeApi() as api:
        api.add_statefulset(NS, "mta", 2)
        yield api


def handoff_tls(directory: Path, client_certs: bool = True) -> tuple[dict[str, str], trustme.CA]:
    """``drain.tls`` for the pods: one certificate for every pod (as cert-manager's component issues it)."""
    ca = trustme.CA()
    directory.mkdir(exist_ok=True)
    cert = ca.issue_cert("kubemta-handoff")  # one name for every pod, as the handoff-tls component issues it
    cert.private_key_pem.write_to_path(str(directory / "tls.key"))
    cert.cert_chain_pems[0].write_to_path(str(directory / "tls.crt"))
    ca.cert_pem.write_to_path(str(directory / "ca.crt"))
    config = {"cert_file": str(directory / "tls.crt"), "key_file": str(directory / "tls.key"),
              "ca_file": str(directory / "ca.crt"), "server_name": "kubemta-handoff"}
    if client_certs:
        config["client_ca_file"] = str(directory / "ca.crt")
    return config, ca


def pods(world: World, kube: FakeKubeApi, secret: Path,
         tls: dict[str, str] | None = None) -> tuple[MtaServer, MtaServer, int]:
    handoff_0 = free_port()
    servers = []
    for ordinal in (0, 1):
        config: dict[str, Any] = {
            "queue": {"retry_initial": "1h", "retry_max": "2h"},  # no retry of its own during the test
            "kubernetes": {"enabled": True, "api_url": kube.url, "namespace": NS, "pod_name": f"mta-{ordinal}",
                           "pod_uid": f"uid-{ordinal}"},
            "drain": {"listen": f"127.0.0.1:{handoff_0 if ordinal == 0 else free_port()}",
                      "secret_file": str(secret),
                      "peer_address": f"127.0.0.1:{handoff_0}",  # every staying pod is mta-0 here
                      "timeout": "30s", "tls": tls},
        }
        servers.append(world.mta(config, name=f"mta-{ordinal}"))
    return servers[0], servers[1], handoff_0


def saw(server: MtaServer, name: str) -> list[dict[str, Any]]:
    return [{k: str(v) for k, v in e.items()} for e in events(server, name)]


def spool_files(server: MtaServer) -> list[str]:
    return sorted(str(p.relative_to(server.spool_dir)) for state in ("incoming", "deferred", "hold", "msg")
                  for p in (server.spool_dir / state).iterdir())


def durable_view(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {item["id"]: {k: item[k] for k in ("state", "sender", "recipients", "attempts", "created",
                                             "next_attempt", "expires", "size")} for item in items}


def queue_mail_on(server: MtaServer, world: World) -> tuple[list[str], list[dict[str, Any]]]:
    """Three messages: one half delivered, one deferred, one on hold."""
    ids = [send_mail(server.port, "a@sender.test", ["user@flaky.test", "other@dest.test"], subject="mixed"),
           send_mail(server.port, "a@sender.test", ["user2@flaky.test"], subject="deferred")]
    server.wait_for_queue(lambda q: len(q) == 2 and all(i["attempts"] >= 1 for i in q), what="first attempts")
    ids.append(send_mail(server.port, "a@sender.test", ["user3@flaky.test"], subject="held"))
    held = server.queue("hold", ids[2])
    assert held.returncode == 0, held.stdout + held.stderr
    before = server.wait_for_queue(lambda q: len(q) == 3 and any(i["state"] == "hold" for i in q),
                                   what="three queued, one held")
    return ids, before


@pytest.mark.parametrize("over", ["http", "tls"])
def test_scale_down_hands_all_mail_to_the_remaining_pod(world: World, kube: FakeKubeApi, peer_dir: Path,
                                                        over: str) -> None:
    flaky = world.sink("flaky", ["-r", "RCPT"])  # 450 for every recipient
    dest = world.sink("dest")
    secret = peer_dir / "drain-secret"
    secret.write_text(secrets.token_hex(32))
    tls = handoff_tls(peer_dir / "handoff-tls")[0] if over == "tls" else None
    mta0, mta1, handoff_0 = pods(world, kube, secret, tls)
    if tls is not None:  # the endpoint speaks only TLS, and only to clients with a certificate
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(f"http://127.0.0.1:{handoff_0}{wire.PATH}", data=b"x", timeout=10)
        context = ssl.create_default_context(cafile=tls["ca_file"])
        context.check_hostname = False  # refused for the missing client certificate, not the name
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            urllib.request.urlopen(f"https://127.0.0.1:{handoff_0}{wire.PATH}", data=b"x", timeout=10,
                                   context=context)
    ids, before = queue_mail_on(mta1, world)
    mixed = next(i for i in before if i["id"] == ids[0])
    assert {r["address"]: r["state"] for r in mixed["recipients"]} == {"user@flaky.test": "pending",
                                                                      "other@dest.test": "delivered"}
    assert len(dest.messages()) == 1

    kube.scale(NS, "mta", 1)
    assert mta1.terminate(timeout=60) == 0
    assert saw(mta1, "drain_started"), mta1.log()
    [finished] = saw(mta1, "drain_finished")
    assert finished["moved"] == "3", mta1.log()
    assert spool_files(mta1) == [], "the leaving pod's spool is empty"

    after = mta0.queue_list()
    assert durable_view(after) == durable_view(before), "state, attempts, next attempt and expiry kept"
    reasons = [e["reason"] for e in kube.events_for(NS, "mta-1")]
    assert reasons == ["Draining", "Drained"]
    assert kube.events_for(NS, "mta-1")[0]["involvedObject"]["uid"] == "uid-1"

    # No retry storm: mta-0 keeps the schedule; nothing is tried early.
    assert not saw(mta0, "attempt")

    flaky.restart([])
    assert mta0.queue("release", ids[2]).returncode == 0
    assert mta0.queue("flush").returncode == 0
    mta0.wait_queue_empty(timeout=30)
    delivered = flaky.wait_for_messages(3, timeout=10)
    assert sorted(r for m in delivered for r in m.recipients) == ["user2@flaky.test", "user3@flaky.test",
                                                                  "user@flaky.test"]
    assert len(dest.messages()) == 1, "a recipient delivered before the drain is not delivered again"
    assert sorted(m.data.count(b"with ESMTP id") for m in delivered) == [1, 1, 1]


def test_rolling_restart_keeps_mail_and_mta_drain_moves_it_by_hand(world: World, kube: FakeKubeApi,
                                                                    peer_dir: Path) -> None:
    world.sink("flaky", ["-r", "RCPT"])
    secret = peer_dir / "drain-secret"
    secret.write_text(secrets.token_hex(32))
    mta0, mta1, handoff_0 = pods(world, kube, secret)
    ids, before = queue_mail_on(mta1, world)

    assert mta1.terminate(timeout=60) == 0  # replicas is still 2: a restart, not a scale-down
    assert saw(mta1, "drain_not_needed"), mta1.log()
    assert sorted(i["id"] for i in mta1.queue_list()) == sorted(ids)
    assert kube.events_for(NS, "mta-1") == []

    # The spool-rescue Job's command, on the stopped pod's spool.
    # An address names no pod: the requests are signed for the one --to-pod names.
    done = mta1.cli("drain", "--to", f"127.0.0.1:{handoff_0}", "--spool", str(mta1.spool_dir.parent))
    assert done.returncode == 2 and "--to-pod" in done.stderr
    done = mta1.cli("drain", "--to", f"127.0.0.1:{handoff_0}", "--to-pod", "mta-1", "--spool",
                    str(mta1.spool_dir.parent))
    assert "moved=0 duplicates=0 left=3" in done.stdout and "401" in done.stderr, "signed for another pod"
    done = mta1.cli("drain", "--to", f"127.0.0.1:{handoff_0}", "--to-pod", "mta-0", "--spool",
                    str(mta1.spool_dir.parent))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "moved=3 duplicates=0 left=0" in done.stdout
    assert spool_files(mta1) == []
    assert durable_view(mta0.queue_list()) == durable_view(before)

    # A repeat is harmless; while a server owns the spool, drain refuses.
    mta0_spool = mta0.spool_dir.parent
    done = mta0.cli("drain", "--to", f"127.0.0.1:{handoff_0}", "--to-pod", "mta-0", "--spool", str(mta0_spool))
    assert done.returncode == 1 and "stop that server first" in done.stderr


def test_handoff_endpoint_refuses_unsigned_and_wrongly_signed_requests(world: World, kube: FakeKubeApi,
                                                                        peer_dir: Path) -> None:
    secret = peer_dir / "drain-secret"
    secret.write_text(secrets.token_hex(32))
    mta0, _, handoff_0 = pods(world, kube, secret)
    body = b'{"format":1}\nx'
    for headers in ({}, wire.sign(b"w" * 32, body, "mta-0")):
        request = urllib.request.Request(f"http://127.0.0.1:{handoff_0}{wire.PATH}", data=body, headers=headers)
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=10)
        assert caught.value.code == 401
        assert json.loads(caught.value.read()) == {"error": "not authenticated"}
    assert mta0.queue_list() == []
    assert len(saw(mta0, "handoff_refused")) == 2


def record_body(size: int = 5) -> bytes:
    """A real handoff body: a deferred message, due in an hour (nothing is tried during the test)."""
    now = time.time()
    record = Record(id=new_id(), sender="a@sender.test", recipients=[Recipient("x@flaky.test")], created=now,
                    expires=now + 86400, next_attempt=now + 3600, size=size, attempts=1, state="deferred")
    return wire.encode(record, b"x" * size)


def post(port: int, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{wire.PATH}", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read())


def send_until_answered(port: int, head: bytes, length: int, timeout: float = 30.0) -> tuple[int, bytes]:
    """Send ``head`` then up to ``length`` body bytes, stopping once the server answers or closes.

    Returns how many body bytes went out, and the answer."""
    chunk = b"y" * 65536
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        sock.setblocking(False)
        deadline = time.monotonic() + timeout
        answer = b""
        while time.monotonic() < deadline:
            readable, writable, _ = select.select([sock], [sock] if sent < length else [], [], 0.5)
            if readable:
                with contextlib.suppress(ConnectionError):  # closed at once: no answer, still before the body
                    answer = sock.recv(65536)
                break
            if writable:
                try:
                    sent += sock.send(chunk[:length - sent])
                except BlockingIOError:
                    continue
                except ConnectionError:
                    break
        return sent, answer


def test_forged_handoffs_are_refused_before_their_body_is_read(world: World, kube: FakeKubeApi,
                                                               peer_dir: Path) -> None:
    secret = peer_dir / "drain-secret"
    secret.write_text(secrets.token_hex(32))
    mta0, _, handoff_0 = pods(world, kube, secret)
    key = secret.read_bytes().strip()
    length = 24 * 1024 * 1024  # under the endpoint's limit (25 MiB messages and their record)

    def head(headers: dict[str, str], declared: int | None = length) -> bytes:
        fields = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        size = f"Content-Length: {declared}\r\n" if declared is not None else "Transfer-Encoding: chunked\r\n"
        return f"POST {wire.PATH} HTTP/1.1\r\nHost: mta-0\r\n{size}{fields}\r\n".encode()

    forged = wire.sign(b"w" * 32, b"y" * length, "mta-0")
    sent, answer = send_until_answered(handoff_0, head(forged), length)
    assert answer.startswith(b"HTTP/1.1 401"), answer
    assert sent < length // 4, f"{sent} of {length} body bytes sent before the answer"
    unsigned_big, answer = send_until_answered(handoff_0, head({}, 2 * length), 2 * length)
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert unsigned_big < length // 4
    _, answer = send_until_answered(handoff_0, head(wire.sign(key, b"", "mta-0"), None), 0)
    assert answer.startswith(b"HTTP/1.1 411"), answer

    # A real signature over headers whose body is another one: read, then refused.
    body = record_body()
    headers = wire.sign(key, body, "mta-0")
    swapped = body[:-1] + b"z"  # the same length: only the hash tells
    assert post(handoff_0, swapped, headers) == (401, {"error": "not authenticated"})

    body = record_body()
    stale = wire.sign(key, body, "mta-0", now=time.time() - wire.MAX_SKEW - 60)
    assert post(handoff_0, body, stale)[0] == 401
    for_other_pod = wire.sign(key, body, "mta-1")
    assert post(handoff_0, body, for_other_pod)[0] == 401
    assert mta0.queue_list() == []

    headers = wire.sign(key, body, "mta-0")
    status, answer = post(handoff_0, body, headers)
    assert status == 200 and answer["result"] == "accepted"
    assert post(handoff_0, body, headers) == (401, {"error": "not authenticated"}), "a replay (same nonce)"
    assert len(mta0.queue_list()) == 1
    # The sender signs each attempt anew: repeating the handoff itself is harmless.
    assert post(handoff_0, body, wire.sign(key, body, "mta-0"))[1]["result"] == "duplicate"

    reasons = [e["reason"] for e in saw(mta0, "handoff_refused")]
    assert reasons == ["bad signature", f"body of {2 * length} bytes", "no Content-Length",
                       "the body is not the one signed", "timestamp too far from this clock",
                       "signed for pod 'mta-1', this is 'mta-0'", "replayed request (nonce already used)"], reasons
