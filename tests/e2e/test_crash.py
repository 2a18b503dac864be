"""A pod killed with SIGKILL in the middle of a delivery loses nothing once restarted."""

from __future__ import annotations

import time
import uuid

from tests.e2e.world import PODS, World


def test_kill_9_mid_delivery_then_restart_loses_nothing(world: World) -> None:
    pod = world.pods["mta-0"]
    sink = world.restart_sink("mx-flaky", ["-w", "5"])  # 5 s before answering DATA: a delivery in flight
    rcpts = [f"crash-{i}-{uuid.uuid4().hex[:6]}@flaky.test" for i in range(4)]
    try:
        ids = [world.submit([rcpt], subject=f"crash {i}") for i, rcpt in enumerate(rcpts)]
        pod.wait_event("attempt", timeout=20)
        deadline = time.monotonic() + 10
        while not any(e.get("queue_id") in ids for e in pod.events("attempt")) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        pod.kill9()
        assert not [m for m in sink.messages() if set(m.recipients) & set(rcpts)], "delivered before the kill"
        queued = {i["id"] for i in pod.queue_list()}  # offline: straight from the spool files
        assert set(ids) <= queued, f"lost in the crash: {set(ids) - queued}"
    finally:
        sink = world.restart_sink("mx-flaky", [])
    pod.start()
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        got = [r for m in sink.messages() for r in m.recipients if r in rcpts]
        if sorted(got) == sorted(rcpts):
            break
        time.sleep(0.2)
    got = [r for m in sink.messages() for r in m.recipients if r in rcpts]
    assert sorted(got) == sorted(rcpts), f"after the restart: {got}"
    assert {m.client_addr for m in sink.messages() if set(m.recipients) & set(rcpts)} == {PODS["mta-0"]["egress"]}
    pod.wait_queue(lambda q: not {i["id"] for i in q} & set(ids), what="crashed mail delivered and removed")
