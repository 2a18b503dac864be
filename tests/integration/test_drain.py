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

import json
import secrets
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mta.drain import wire
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


def pods(world: World, kube: FakeKubeApi, secret: Path) -> tuple[MtaServer, MtaServer, int]:
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
                      "timeout": "30s"},
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


def test_scale_down_hands_all_mail_to_the_remaining_pod(world: World, kube: FakeKubeApi, peer_dir: Path) -> None:
    flaky = world.sink("flaky", ["-r", "RCPT"])  # 450 for every recipient
    dest = world.sink("dest")
    secret = peer_dir / "drain-secret"
    secret.write_text(secrets.token_hex(32))
    mta0, mta1, _ = pods(world, kube, secret)
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
    done = mta1.cli("drain", "--to", f"127.0.0.1:{handoff_0}", "--spool", str(mta1.spool_dir.parent))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "moved=3 duplicates=0 left=0" in done.stdout
    assert spool_files(mta1) == []
    assert durable_view(mta0.queue_list()) == durable_view(before)

    # A repeat is harmless; while a server owns the spool, drain refuses.
    mta0_spool = mta0.spool_dir.parent
    done = mta0.cli("drain", "--to", f"127.0.0.1:{handoff_0}", "--spool", str(mta0_spool))
    assert done.returncode == 1 and "stop that server first" in done.stderr


def test_handoff_endpoint_refuses_unsigned_and_wrongly_signed_requests(world: World, kube: FakeKubeApi,
                                                                        peer_dir: Path) -> None:
    secret = peer_dir / "drain-secret"
    secret.write_text(secrets.token_hex(32))
    mta0, _, handoff_0 = pods(world, kube, secret)
    body = b'{"format":1}\nx'
    for headers in ({}, wire.sign(b"w" * 32, body)):
        request = urllib.request.Request(f"http://127.0.0.1:{handoff_0}{wire.PATH}", data=body, headers=headers)
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=10)
        assert caught.value.code == 401
        assert json.loads(caught.value.read()) == {"error": "not authenticated"}
    assert mta0.queue_list() == []
    assert len(saw(mta0, "handoff_refused")) == 2
