"""Worker processes: shared listeners, one queue, restarts, nothing lost."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

from spool import Recipient, Record, Spool
from spool.ids import new_id
from tests.conftest import World
from tests.harness import HOST, MtaServer, send_mail
from tests.obs.logs import events, wait_for_event
from tests.obs.scrape import scrape, wait_for_sample
from tests.peers.net import free_port

MESSAGES = 60


def worker_pids(server: MtaServer, count: int = 1) -> list[int]:
    """Pids of the workers started so far, once there are ``count``."""
    return [e["worker_pid"] for e in wait_for_event(server, "worker_started", count=count)]


def listening_pids(port: int) -> set[int]:
    out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    words = out.replace(",", " ").replace(")", " ").split()
    return {int(word.split("=")[1]) for word in words if word.startswith("pid=")}


def test_workers_share_the_relay_port_and_the_main_process_delivers_everything(world: World) -> None:
    sink = world.sink("dest")
    server = world.mta({"workers": 2})
    workers = set(worker_pids(server, count=2))
    assert server.proc is not None and server.proc.pid not in workers
    assert listening_pids(server.port) == workers

    def one(i: int) -> str:
        return send_mail(server.port, "a@sender.test", [f"user{i}@dest.test"], subject=f"w{i}")

    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(one, range(MESSAGES)))
    assert len(set(ids)) == MESSAGES
    sink.wait_for_messages(MESSAGES, timeout=60)
    server.wait_queue_empty()
    received = events(server, "received")
    assert {e["queue_id"] for e in received} == set(ids)
    # Connections were spread over both workers (all to one: 2**-59).
    assert {e["pid"] for e in received} == workers
    # Every delivery is the main process's, whoever received the message.
    assert {e["pid"] for e in events(server, "delivered")} == {server.proc.pid}
    # The workers' events, stores and commits reach the main process's metrics.
    metrics = scrape(server)
    assert metrics.get("kubemta_messages_received_total", listener="relay", result="accepted") == MESSAGES
    assert metrics.get("kubemta_spool_write_duration_seconds_count", operation="store") == MESSAGES
    # Worker counters arrive with their next report (every second): stores there, removals here.
    metrics = wait_for_sample(server, "kubemta_spool_commit_changes_total", 2 * MESSAGES)
    assert metrics.get("kubemta_spool_commit_changes_total") == 2 * MESSAGES


def test_auth_listeners_stay_in_the_main_process(world: World, tmp_path) -> None:  # type: ignore[no-untyped-def]
    users = tmp_path / "users"
    users.write_text("")
    submission = free_port(HOST)
    server = world.mta({"workers": 2, "listeners": [
        {"name": "relay", "address": "127.0.0.1:{port}", "mode": "relay", "trusted_networks": ["127.0.0.0/8"]},
        {"name": "submission", "address": f"127.0.0.1:{submission}", "mode": "submission",
         "auth": {"credentials_file": str(users), "allow_plaintext": True}}]})
    workers = set(worker_pids(server, count=2))
    assert server.proc is not None
    assert listening_pids(submission) == {server.proc.pid}
    assert listening_pids(server.port) == workers


def test_a_killed_worker_is_replaced_and_its_unannounced_mail_is_delivered(world: World) -> None:
    sink = world.sink("dest")
    server = world.mta({"workers": 1})
    [first] = worker_pids(server)
    # What a worker leaves behind when it dies between storing and announcing:
    # a committed message the main process was never told about.
    orphan_spool = Spool(server.spool_dir)
    orphan_spool.attach()
    now = time.time()
    orphan = orphan_spool.store_blocking(b"From: a@sender.test\r\nSubject: orphan\r\n\r\nbody\r\n", Record(
        id=new_id(now), sender="a@sender.test", recipients=[Recipient("orphan@dest.test")], created=now,
        expires=now + 3600, next_attempt=now, size=0))
    orphan_spool.close()
    os.kill(first, signal.SIGKILL)
    exited = wait_for_event(server, "worker_exited", timeout=20)
    assert exited[-1]["worker_pid"] == first
    [_, second] = worker_pids(server, count=2)
    assert second != first
    delivered = sink.wait_for_messages(1, timeout=30)
    assert b"Subject: orphan" in delivered[0].data
    assert events(server, "delivered", queue_id=orphan.id)
    # And the replacement takes mail again.
    for i in range(10):
        send_mail(server.port, "a@sender.test", [f"after{i}@dest.test"])
    sink.wait_for_messages(11, timeout=30)


def test_workers_stop_with_the_server_and_when_it_dies(world: World) -> None:
    server = world.mta({"workers": 1})
    [worker] = worker_pids(server)
    assert server.terminate() == 0
    assert gone(worker)
    server.start()
    [_, worker] = worker_pids(server, count=2)
    server.kill9()
    # It sees the end of its channel and finishes its sessions within shutdown.timeout (5 s here).
    deadline = time.monotonic() + 20
    while not gone(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gone(worker)


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_workers_start_from_a_directory_holding_a_spool_directory(world: World) -> None:
    """The installed ``mta`` run where a data directory ``spool/`` sits: workers import the real spool package."""
    sink = world.sink("dest")
    server = world.mta({"workers": 1}, start=False)
    server.spool_dir.parent.mkdir(parents=True)  # the server's cwd now holds spool/
    server.start(entry_point=True)
    worker_pids(server, count=1)
    send_mail(server.port, "a@sender.test", ["user@dest.test"])
    sink.wait_for_messages(1, timeout=30)
    assert "ImportError" not in server.log()
