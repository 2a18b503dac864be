"""Traffic shaping against real receivers: throttle replies slow a destination,
per-destination rates hold, and the daily cap stops delivery for the day."""

from __future__ import annotations

import datetime as dt
import time

from tests.conftest import World
from tests.harness import send_mail
from tests.obs.logs import events, records, wait_for_event


def test_a_throttling_destination_is_left_alone_for_its_cool_down(world: World) -> None:
    world.sink("flaky", ["-Q", "RCPT"])  # 421 and hang up at RCPT
    server = world.mta({"delivery": {"max_per_destination": 1}})
    for n in range(3):
        send_mail(server.port, "a@sender.test", [f"user{n}@flaky.test"])
    wait_for_event(server, "throttled")
    items = server.wait_for_queue(lambda q: len(q) == 3 and all(i["attempts"] >= 1 for i in q),
                                  what="all three attempted or deferred")
    replies = [i["recipients"][0]["last_reply"] for i in items]
    assert sum("asked to slow down" in r for r in replies) >= 1
    attempts_before = len(events(server, "attempt"))
    assert server.queue("flush").returncode == 0
    server.wait_for_queue(lambda q: all(i["attempts"] >= 2 for i in q), what="flushed during the cool-down")
    # During the cool-down the destination is not even connected to.
    assert len(events(server, "attempt")) == attempts_before


def test_messages_per_minute_rule_holds(world: World) -> None:
    sink = world.sink("dest")
    server = world.mta({"shaping": {"rules": [{"match": ["dest.test"], "messages_per_minute": 2}]}})
    for n in range(4):
        send_mail(server.port, "a@sender.test", [f"user{n}@dest.test"])
    sink.wait_for_messages(2, timeout=20)
    time.sleep(3)
    assert len(sink.messages()) == 2  # the next two wait for the minute to pass
    # A stop does not wait for that minute (nor for shutdown.timeout).
    server.stop()
    times = {item["event"]: item["ts"] for item in records(server.log())
             if item.get("event") in ("stopping", "stopped")}
    took = (dt.datetime.fromisoformat(times["stopped"]) - dt.datetime.fromisoformat(times["stopping"])).total_seconds()
    assert took < 2.5, took  # the harness's shutdown.timeout is 5 s
    server.start()  # nothing was lost: they go out after the restart (the rule counts per process)
    sink.wait_for_messages(4, timeout=20)


def test_daily_cap_holds_the_rest_until_tomorrow(world: World) -> None:
    sink = world.sink("dest")
    server = world.mta({"shaping": {"daily_cap": 2}})
    for n in range(2):
        send_mail(server.port, "a@sender.test", [f"user{n}@dest.test"])
    sink.wait_for_messages(2, timeout=20)
    last = send_mail(server.port, "a@sender.test", ["late@dest.test"])
    wait_for_event(server, "daily_cap_reached")
    time.sleep(2)
    assert len(sink.messages()) == 2
    assert [i["id"] for i in server.queue_list()] == [last]
