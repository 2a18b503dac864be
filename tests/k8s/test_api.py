"""mta.k8s against the fake API server with the real ``kubernetes`` client; the handoff wire format."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mta.config import Config, KubernetesConfig
from mta.drain import wire
from mta.drain.sender import Target
from mta.drain.service import peer_targets
from mta.k8s.api import KubeApi, KubeError, try_event
from mta.k8s.identity import IdentityError, PodIdentity, pod_identity
from spool import Recipient, Record
from tests.fakes.kube_api import FakeKubeApi


@pytest.fixture
def fake() -> Iterator[FakeKubeApi]:
    with FakeKubeApi(token="t0ken") as server:
        server.add_statefulset("mail", "kubemta", 3)
        yield server


def kube_config(fake: FakeKubeApi, tmp_path: Path, **extra: object) -> KubernetesConfig:
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    return KubernetesConfig(enabled=True, namespace="mail", api_url=fake.url, token_file=token, **extra)


def test_identity_from_pod_name_or_hostname() -> None:
    pod = pod_identity(KubernetesConfig(pod_name="kubemta-2", namespace="mail", pod_uid="u-1"))
    assert pod == PodIdentity("kubemta-2", "mail", "kubemta", 2, "u-1")
    assert pod_identity(KubernetesConfig(), hostname="my-mta-10.svc.local").ordinal == 10
    assert pod_identity(KubernetesConfig(), hostname="my-mta-10").statefulset == "my-mta"
    with pytest.raises(IdentityError, match="does not end in -<ordinal>"):
        pod_identity(KubernetesConfig(), hostname="laptop")
    with pytest.raises(IdentityError, match="not a pod of StatefulSet"):
        pod_identity(KubernetesConfig(pod_name="other-1", statefulset="kubemta"))


def test_reads_replicas_and_creates_events(fake: FakeKubeApi, tmp_path: Path) -> None:
    config = kube_config(fake, tmp_path)
    api = KubeApi(config, pod_identity(config.model_copy(update={"pod_name": "kubemta-2", "pod_uid": "abc"})))
    try:
        assert api.desired_replicas() == 3
        fake.scale("mail", "kubemta", 2)
        assert api.desired_replicas() == 2
        api.event("Draining", "handing 3 message(s) to kubemta-0", "Normal")
    finally:
        api.close()
    assert ("GET", "/apis/apps/v1/namespaces/mail/statefulsets/kubemta") in fake.requests
    [event] = fake.events_for("mail", "kubemta-2")
    assert event["reason"] == "Draining" and event["type"] == "Normal"
    assert event["involvedObject"] == {"apiVersion": "v1", "kind": "Pod", "name": "kubemta-2",
                                       "namespace": "mail", "uid": "abc"}
    assert event["metadata"]["name"].startswith("kubemta-2.")
    assert event["source"]["component"] == "kubemta" and event["reportingComponent"] == "kubemta"


def test_api_errors_name_the_object_and_the_status(fake: FakeKubeApi, tmp_path: Path) -> None:
    config = kube_config(fake, tmp_path, statefulset="missing", pod_name="missing-0")
    api = KubeApi(config, pod_identity(config))
    try:
        with pytest.raises(KubeError, match=r"StatefulSet mail/missing: HTTP 404.*not found"):
            api.desired_replicas()
    finally:
        api.close()
    wrong = tmp_path / "wrong"
    wrong.write_text("nope")
    config = KubernetesConfig(enabled=True, namespace="mail", api_url=fake.url, token_file=wrong, pod_name="kubemta-0")
    api = KubeApi(config, pod_identity(config))
    try:
        with pytest.raises(KubeError, match="HTTP 401"):
            api.desired_replicas()
        try_event(api, "Drained", "never stored")  # only logged
    finally:
        api.close()
    assert fake.events_for("mail", "kubemta-0") == []


def test_unreachable_api_is_a_kube_error(tmp_path: Path) -> None:
    config = KubernetesConfig(enabled=True, api_url="http://127.0.0.1:9", pod_name="kubemta-1", timeout=2)
    api = KubeApi(config, pod_identity(config))
    started = time.monotonic()
    try:
        with pytest.raises(KubeError, match="cannot read StatefulSet default/kubemta"):
            api.desired_replicas()
    finally:
        api.close()
    assert time.monotonic() - started < 30


def test_outside_a_cluster_without_api_url_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    config = KubernetesConfig(enabled=True, pod_name="kubemta-0")
    with pytest.raises(KubeError, match="not running in a cluster"):
        KubeApi(config, pod_identity(config))


def test_wire_round_trip_and_signature() -> None:
    record = Record(id="0123456789ABCDEFGHJK", sender="a@b.test",
                    recipients=[Recipient("x@y.test", state="delivered", last_reply="250 ok"), Recipient("z@y.test")],
                    created=1000.0, expires=2000.0, next_attempt=1500.0, size=5, attempts=3, state="deferred")
    body = wire.encode(record, b"hello")
    decoded, message = wire.decode(body)
    assert message == b"hello" and decoded.to_json() == record.to_json()
    secret = b"s" * 32
    headers = wire.sign(secret, body, "kubemta-0", now=1_000_000)
    assert wire.verify_headers(secret, headers, len(body), "kubemta-0", now=1_000_100) == headers[wire.NONCE]
    wire.verify_body(headers, body)
    with pytest.raises(wire.WireError, match="bad signature"):
        wire.verify_headers(b"x" * 32, headers, len(body), "kubemta-0", now=1_000_000)
    with pytest.raises(wire.WireError, match="bad signature"):  # the length is signed
        wire.verify_headers(secret, headers, len(body) + 1, "kubemta-0", now=1_000_000)
    for name in (wire.TIMESTAMP, wire.TARGET, wire.NONCE, wire.BODY_SHA256):
        forged = {**headers, name: "1000001" if name == wire.TIMESTAMP else
                  "kubemta-1" if name == wire.TARGET else "0" * (32 if name == wire.NONCE else 64)}
        with pytest.raises(wire.WireError, match="bad signature"):
            wire.verify_headers(secret, forged, len(body), "kubemta-0", now=1_000_000)
    with pytest.raises(wire.WireError, match="signed for pod 'kubemta-0'"):
        wire.verify_headers(secret, headers, len(body), "kubemta-1", now=1_000_000)
    with pytest.raises(wire.WireError, match="not the one signed"):
        wire.verify_body(headers, body + b"!")
    with pytest.raises(wire.WireError, match="too far"):
        wire.verify_headers(secret, headers, len(body), "kubemta-0", now=1_000_000 + 3600)
    with pytest.raises(wire.WireError, match="unsigned"):
        wire.verify_headers(secret, {}, len(body), "kubemta-0")
    assert wire.sign(secret, body, "kubemta-0")[wire.NONCE] != wire.sign(secret, body, "kubemta-0")[wire.NONCE]
    with pytest.raises(wire.WireError, match="says 5"):
        wire.decode(body + b"more")


def test_nonce_log_refuses_replays_forgets_after_the_window_and_is_bounded() -> None:
    log = wire.NonceLog(max_entries=3, window=600)
    log.add("a" * 32, now=0)
    with pytest.raises(wire.ReplayError):
        log.add("a" * 32, now=599)
    log.add("b" * 32, now=10)
    log.add("c" * 32, now=20)
    with pytest.raises(wire.NonceLogFull):  # full of nonces still in their window: refuse, forget none
        log.add("d" * 32, now=30)
    log.add("d" * 32, now=601)  # "a" has left the window
    assert len(log) == 3
    log.add("a" * 32, now=1300)  # so may its nonce come again (its timestamp is stale by then)
    assert len(log) == 1


def test_peer_targets_are_the_pods_that_stay() -> None:
    config = Config()
    pod = PodIdentity("kubemta-3", "mail", "kubemta", 3)
    assert peer_targets(config, pod, 2) == [Target("kubemta-0.kubemta-headless.mail.svc:8025", "kubemta-0"),
                                            Target("kubemta-1.kubemta-headless.mail.svc:8025", "kubemta-1")]
    assert peer_targets(config, PodIdentity("kubemta-0", "mail", "kubemta", 0), 1) == []
