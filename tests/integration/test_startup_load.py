"""A restart with a large queue: ``mta serve`` listens first and loads the spool in the background.

The spool is filled with 30,000 deferred messages (written as the spool
writes them, without a server) and one message file whose metadata was never
written; then a real ``mta serve`` starts.  Mail sent as soon as it answers is
accepted and delivered to a real receiver (smtp-sink) while the earlier queue
is still loading — the log shows both before ``spool_loaded`` — and the load
then finds every earlier message and removes the uncommitted file, and
nothing of the new mail.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from spool import Recipient, Record
from spool.ids import new_id
from tests.conftest import World
from tests.harness import send_mail
from tests.obs.logs import records, wait_for_event
from tests.obs.scrape import scrape

QUEUED = 30_000


def fill(shard: Path, count: int) -> None:
    for name in ("msg", "deferred", "incoming", "hold", "tmp", "corrupt"):
        (shard / name).mkdir(mode=0o700, parents=True, exist_ok=True)
    now = time.time()
    body = b"From: app@sender.test\r\nSubject: waiting\r\n\r\nqueued before the restart\r\n"
    for n in range(count):
        record = Record(id=new_id(now - 3600 + n / 1000), sender="app@sender.test",
                        recipients=[Recipient(f"user{n}@later.test")], created=now - 3600, expires=now + 86400,
                        next_attempt=now + 86400, size=len(body), attempts=1, state="deferred")
        (shard / "msg" / record.id).write_bytes(body)
        (shard / "deferred" / f"{record.id}.json").write_bytes(record.dumps())
    (shard / "msg" / new_id(now - 60)).write_bytes(b"never acknowledged")
    os.sync()


def test_mail_is_taken_and_delivered_while_a_large_queue_loads(world: World) -> None:
    world.sink("dest")
    server = world.mta(start=False)
    fill(server.spool_dir, QUEUED)
    server.start(wait=False)
    server.wait_ready(timeout=60, loaded=False)
    queue_id = send_mail(server.port, "app@sender.test", ["fresh@dest.test"])
    world.sinks["dest"].wait_for_messages(1, timeout=30)
    [loaded] = wait_for_event(server, "spool_loaded", timeout=120)
    assert (loaded["messages"], loaded["removed_uncommitted"], loaded["quarantined"]) == (QUEUED, 1, 0)

    order = [(item["event"], item.get("queue_id")) for item in records(server.log())
             if item.get("event") in ("received", "delivered", "spool_loaded")]
    assert order.index(("delivered", queue_id)) < order.index(("spool_loaded", None)), (order, loaded)
    assert order.index(("received", queue_id)) < order.index(("delivered", queue_id))

    metrics = scrape(server)
    assert metrics.get("kubemta_queue_messages", state="deferred") == QUEUED
    assert not list((server.spool_dir / "corrupt").iterdir())
    # What the load kept is the spool's own: the next start loads the same, before it is ready.
    server.stop()
    server.start()
    [_, again] = wait_for_event(server, "spool_loaded", count=2)
    assert (again["messages"], again["removed_uncommitted"]) == (QUEUED, 0)
    assert json.loads(server.queue("list", "--json").stdout)[0]["state"] == "deferred"


def test_a_stop_while_loading_keeps_every_message(world: World) -> None:
    server = world.mta(start=False)
    fill(server.spool_dir, QUEUED)
    server.start(wait=False)
    server.wait_ready(timeout=60, loaded=False)
    assert not server.loaded(), "the load ended before the stop: nothing tested"
    server.stop()
    assert server.proc is not None and server.proc.returncode == 0, server.log()[-2000:]
    server.start()
    [_, again] = wait_for_event(server, "spool_loaded", count=2)
    assert (again["messages"], again["quarantined"]) == (QUEUED, 0)
