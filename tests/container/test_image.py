"""The real image: built from the Dockerfile, run read-only as non-root, delivering, stopping on SIGTERM.

Slow (a first build on a fresh machine makes the debootstrap base, about a
minute, then the image); later runs reuse podman's cache, so marked
``slow``.  Skipped, with the reason, where podman is not installed (in CI
that is a failure, see ``tests.ci``).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.container import image
from tests.harness import send_mail
from tests.peers.net import free_port, wait_port
from tests.peers.sink import SmtpSink

pytestmark = [
    pytest.mark.container,
    pytest.mark.slow,
    pytest.mark.skipif(bool(image.missing_tools()),
                       reason=f"podman image tests need {', '.join(image.missing_tools())} "
                              "(apt-get install podman runc buildah debootstrap)"),
]

UID = 10001
GRACE = 30


@pytest.fixture(scope="module")
def built() -> None:
    started = time.monotonic()
    image.build()
    print(f"image built in {time.monotonic() - started:.1f}s")


@pytest.fixture
def container_name() -> Iterator[str]:
    name = f"kubemta-test-{uuid.uuid4().hex[:8]}"
    yield name
    image.remove(name)


def podman(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*image.PODMAN, *args], capture_output=True, text=True, timeout=timeout)


def test_image_runs_read_only_as_non_root_delivers_and_stops_on_sigterm(
        built: None, container_name: str, peer_dir: Path) -> None:
    sink = SmtpSink("127.0.0.1", free_port(), peer_dir / "sink")
    sink.start()
    try:
        smtp, http = free_port(), free_port()
        config = {
            "hostname": "mta.kubemta.test",
            "spool": {"path": "/var/spool/kubemta"},
            "listeners": [{"name": "relay", "address": f"127.0.0.1:{smtp}", "mode": "relay",
                           "trusted_networks": ["127.0.0.0/8"]}],
            "routes": [{"domains": ["*"], "relay": sink.address, "tls": "none"}],
            "http": {"address": f"127.0.0.1:{http}"},
            "shutdown": {"timeout": "10s"},
        }
        config_file = peer_dir / "mta.yaml"
        config_file.write_text(yaml.safe_dump(config))
        config_file.chmod(0o644)
        spool = peer_dir / "spool"
        spool.mkdir()
        os.chown(spool, UID, UID)
        started = podman("run", "-d", "--name", container_name, *image.RUN_LIMITS, "--network", "host",
                         "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
                         "-v", f"{spool}:/var/spool/kubemta", "-v", f"{config_file}:/etc/kubemta/mta.yaml:ro",
                         "-e", "MTA_CONFIG=/etc/kubemta/mta.yaml", image.IMAGE, timeout=120)
        assert started.returncode == 0, started.stderr

        def logs() -> str:
            done = podman("logs", container_name)
            return done.stdout + done.stderr

        try:
            wait_port("127.0.0.1", smtp, timeout=60)
        except (TimeoutError, RuntimeError) as exc:
            pytest.fail(f"the container does not listen: {exc}\n{logs()}")
        assert podman("exec", container_name, "id", "-u").stdout.strip() == str(UID)
        denied = podman("exec", container_name, "touch", "/opt/kubemta/x")
        assert denied.returncode != 0 and "Read-only file system" in denied.stderr
        inspect = json.loads(podman("inspect", container_name).stdout)[0]
        assert inspect["Config"]["User"] == f"{UID}:{UID}"
        assert inspect["Config"]["Entrypoint"] in (["mta"], "mta")
        assert podman("exec", container_name, "sh", "-c", "command -v gcc cc pip || true").stdout.strip() == ""

        queue_id = send_mail(smtp, "app@sender.test", ["someone@dest.test"], subject="from the container")
        [message] = sink.wait_for_messages(1, timeout=30)
        assert message.recipients == ["someone@dest.test"] and queue_id.encode() in message.data
        assert list(spool.glob("0/msg/*")) == [], "delivered mail leaves the spool"

        before = time.monotonic()
        stopped = podman("stop", "-t", str(GRACE), container_name, timeout=GRACE + 30)
        took = time.monotonic() - before
        assert stopped.returncode == 0, stopped.stderr
        state = json.loads(podman("inspect", container_name).stdout)[0]["State"]
        assert state["ExitCode"] == 0, logs()
        assert took < GRACE, f"SIGTERM took {took:.1f}s: it was killed, not stopped"
        assert '"stopped"' in logs() or "event=stopped" in logs()
    finally:
        sink.stop()


def test_image_starts_on_the_embedded_default_outside_kubernetes(built: None, container_name: str,
                                                                  tmp_path: Path) -> None:
    """``podman run IMAGE`` with nothing else: no StatefulSet, no mounted file, still a running MTA."""
    checked = podman("run", "--rm", *image.RUN_LIMITS, image.IMAGE, "check-config", timeout=120)
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["kubernetes"]["enabled"] is False
    spool = tmp_path / "spool"
    spool.mkdir()
    os.chown(spool, UID, UID)
    started = podman("run", "-d", "--name", container_name, *image.RUN_LIMITS, "--read-only",
                     "-v", f"{spool}:/var/spool/kubemta", image.IMAGE, timeout=120)
    assert started.returncode == 0, started.stderr
    deadline = time.monotonic() + 60
    logs = ""
    while time.monotonic() < deadline:
        done = podman("logs", container_name)
        logs = done.stdout + done.stderr
        if '"event":"started"' in logs or "cannot start" in logs:
            break
        time.sleep(0.5)
    assert '"event":"started"' in logs, logs
    assert "pod name" not in logs and "cannot start" not in logs, logs
    ready = podman("exec", container_name, "python3", "-c",
                   "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8080/readyz').status)")
    assert ready.stdout.strip() == "200", ready.stdout + ready.stderr
