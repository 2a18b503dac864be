"""The disk guard on a real, small tmpfs spool: 452 and unready below the reserve, then recovery."""

from __future__ import annotations

import os
import smtplib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import World
from tests.harness import HOST, MtaServer, send_mail
from tests.obs.logs import events
from tests.obs.scrape import scrape


@pytest.fixture
def small_spool(world: World) -> Iterator[tuple[MtaServer, Path]]:
    server = world.mta({"disk": {"min_free": "1M", "min_free_inodes": 0, "check_interval": "0.2s"},
                        "queue": {"retry_initial": "1h", "retry_max": "1h"}}, start=False)
    mountpoint = Path(server.config["spool"]["path"])
    mountpoint.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mountpoint)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield server, mountpoint
    finally:
        server.stop()
        subprocess.run(["umount", str(mountpoint)], check=False)


def mail_from(port: int) -> tuple[int, bytes]:
    with smtplib.SMTP(HOST, port, timeout=10) as client:
        client.ehlo("app.kubemta.test")
        return client.mail("a@sender.test")


def wait_until(predicate, what: str, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise TimeoutError(what)


def test_full_disk_refuses_new_mail_turns_unready_keeps_delivering_and_recovers(
        world: World, small_spool: tuple[MtaServer, Path]) -> None:
    server, mountpoint = small_spool
    server.start()
    queued = send_mail(server.port, "a@sender.test", ["user@dest.test"])  # no MX answers yet: it waits
    server.wait_for_queue(lambda q: q and q[0]["attempts"] >= 1, what="first attempt")

    stat = os.statvfs(mountpoint)
    filler = mountpoint / "filler"
    filler.write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - 600 * 1024))  # leaves ~600K of 2M free

    wait_until(lambda: server.readyz()[0] == 503, "readyz turns 503")
    _, body = server.readyz()
    assert body["checks"]["disk"]["ok"] is False
    assert "below the reserve" in body["checks"]["disk"]["detail"]
    assert body["checks"]["spool"]["ok"] is True  # writable still: it is the reserve that is gone
    code, text = mail_from(server.port)
    assert (code, text.split(b" ", 1)[0]) == (452, b"4.3.1")
    assert [e for e in events(server, "rejected", listener="relay") if e["reply"].startswith("452 4.3.1")]
    metrics = scrape(server)
    assert metrics.get("kubemta_spool_disk_guard_active") == 1
    assert metrics.get("kubemta_ready") == 0
    assert metrics.get("kubemta_rejections_total", listener="relay", reason="insufficient_storage") >= 1

    # Delivery goes on below the reserve, and frees space.
    sink = world.sink("dest")
    assert server.queue("flush").returncode == 0
    assert [m.recipients for m in sink.wait_for_messages(1, timeout=20)] == [["user@dest.test"]]
    server.wait_queue_empty()
    assert events(server, "delivered", queue_id=queued)

    filler.unlink()
    wait_until(lambda: server.readyz()[0] == 200, "readyz back to 200")
    assert mail_from(server.port)[0] == 250
    send_mail(server.port, "a@sender.test", ["again@dest.test"])
    sink.wait_for_messages(2, timeout=20)
    assert scrape(server).get("kubemta_spool_disk_guard_active") == 0
    assert [e["active"] for e in events(server, "disk_guard")] == [True, False]
