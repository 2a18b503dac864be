"""Limits that hold for the whole deployment: two kubemta processes (one with
worker processes) share one real Redis, and the receiving peer measures
what arrives — connections open at once, messages in a minute — against
one shaping rule, not a multiple of it.  A killed process's connection
slot comes back; Redis stopped mid-run costs no mail; the daily cap
survives a restart."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import HOSTS, World, limits_store
from tests.harness import MtaServer, send_mail
from tests.obs.logs import wait_for_event
from tests.obs.scrape import wait_for_sample
from tests.peers.recorder import Recorder
from tests.peers.redis import RedisServer


@pytest.fixture
def receiver(world: World) -> Iterator[Recorder]:
    """dest.test's MX, slow enough at DATA that connections stay open."""
    recorder = Recorder(host=HOSTS["dest"], port=world.port, delays={"*": 0.5, "hold@dest.test": 40})
    recorder.start()
    try:
        yield recorder
    finally:
        recorder.stop()


def pod(world: World, redis: RedisServer, name: str, rule: dict[str, Any], shaping: dict[str, Any] | None = None,
        **extra: Any) -> MtaServer:
    config = {"hostname": f"{name}.kubemta.test", "limits": {"store": limits_store(world, redis, name)},
              "shaping": {"rules": [{"match": ["dest.test"], **rule}], **(shaping or {})}, **extra}
    return world.mta(config, name=name)


def by_pod(receiver: Recorder) -> dict[str, int]:
    counts: dict[str, int] = {}
    for message in receiver.messages:
        counts[message.helo] = counts.get(message.helo, 0) + 1
    return counts


def test_two_pods_keep_one_connection_limit_between_them(world: World, redis: RedisServer,
                                                         receiver: Recorder) -> None:
    a = pod(world, redis, "a", {"max_connections": 2})
    b = pod(world, redis, "b", {"max_connections": 2}, workers=2)
    for n in range(6):
        send_mail(a.port, "app@sender.test", [f"a{n}@dest.test"])
        send_mail(b.port, "app@sender.test", [f"b{n}@dest.test"])
    receiver.wait_for(12, timeout=60)
    # Each pod alone may open two; together they never had more than two open.
    assert receiver.handler.peak == 2, receiver.handler.peak
    assert by_pod(receiver) == {"a.kubemta.test": 6, "b.kubemta.test": 6}


def test_two_pods_keep_one_messages_per_minute_rule_between_them(world: World, redis: RedisServer,
                                                                 receiver: Recorder) -> None:
    a = pod(world, redis, "a", {"messages_per_minute": 3})
    b = pod(world, redis, "b", {"messages_per_minute": 3})
    for n in range(3):
        send_mail(a.port, "app@sender.test", [f"a{n}@dest.test"])
        send_mail(b.port, "app@sender.test", [f"b{n}@dest.test"])
    receiver.wait_for(3, timeout=30)
    time.sleep(4)
    assert len(receiver.messages) == 3, by_pod(receiver)  # not 3 from each
    queued = len(a.queue_list()) + len(b.queue_list())
    assert queued == 3, "the rest waits for the minute to pass"


def test_a_killed_pods_connection_slot_comes_back_after_its_lease(world: World, redis: RedisServer,
                                                                 receiver: Recorder) -> None:
    a = pod(world, redis, "a", {"max_connections": 1})
    b = pod(world, redis, "b", {"max_connections": 1})
    send_mail(a.port, "app@sender.test", ["hold@dest.test"])  # the receiver keeps its DATA 40 s
    deadline = time.monotonic() + 20
    while receiver.handler.concurrent < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert receiver.handler.concurrent == 1, "a never connected"
    send_mail(b.port, "app@sender.test", ["quick@dest.test"])
    time.sleep(3)
    assert receiver.messages == [] and receiver.handler.peak == 1, "b took a slot a holds"
    a.kill9()
    killed = time.monotonic()
    receiver.wait_for(1, timeout=20)
    assert receiver.messages[0].helo == "b.kubemta.test"
    # The slot came back once a's lease ran out (3 s), not at once and not never.
    assert time.monotonic() - killed < 15


def test_redis_stopped_mid_run_loses_nothing_and_the_pods_return_to_it(world: World, redis: RedisServer,
                                                                       receiver: Recorder) -> None:
    a = pod(world, redis, "a", {"max_connections": 2})
    b = pod(world, redis, "b", {"max_connections": 2})
    send_mail(a.port, "app@sender.test", ["first-a@dest.test"])
    send_mail(b.port, "app@sender.test", ["first-b@dest.test"])
    receiver.wait_for(2, timeout=30)
    redis.stop()
    for n in range(4):
        send_mail(a.port, "app@sender.test", [f"a{n}@dest.test"])
        send_mail(b.port, "app@sender.test", [f"b{n}@dest.test"])
    receiver.wait_for(10, timeout=60)
    for server in (a, b):
        down = wait_for_event(server, "limits_store_down")
        assert len(down) == 1 and down[0]["replicas"] == 2
        wait_for_sample(server, "kubemta_limits_store_up", 0.0)
    # Without the store each pod kept half of the two connections.
    assert receiver.handler.peak <= 2, receiver.handler.peak
    redis.start()  # same address
    time.sleep(1.5)  # past limits.store.retry
    for n in range(2):
        send_mail(a.port, "app@sender.test", [f"back-a{n}@dest.test"])
        send_mail(b.port, "app@sender.test", [f"back-b{n}@dest.test"])
    receiver.wait_for(14, timeout=60)
    for server in (a, b):
        wait_for_event(server, "limits_store_up")
        wait_for_sample(server, "kubemta_limits_store_up", 1.0)
        assert server.queue_list() == []
    assert sorted(by_pod(receiver).values()) == [7, 7]


def two_delivered_then_restarted(a: MtaServer, receiver: Recorder) -> None:
    for n in range(2):
        send_mail(a.port, "app@sender.test", [f"u{n}@dest.test"])
    receiver.wait_for(2, timeout=30)
    a.stop()
    a.start()


def test_the_daily_cap_survives_a_restart(world: World, redis: RedisServer, receiver: Recorder) -> None:
    a = pod(world, redis, "a", {"max_connections": 2}, shaping={"daily_cap": 2})
    two_delivered_then_restarted(a, receiver)
    last = send_mail(a.port, "app@sender.test", ["late@dest.test"])
    assert a.proc is not None
    wait_for_event(a, "daily_cap_reached", pid=a.proc.pid)  # the process after the restart knows the count
    time.sleep(2)
    assert len(receiver.messages) == 2
    assert [item["id"] for item in a.queue_list()] == [last]


def test_a_providers_warmup_cap_survives_a_restart(world: World, redis: RedisServer, receiver: Recorder) -> None:
    today = time.strftime("%Y-%m-%d", time.gmtime())
    a = pod(world, redis, "a", {"max_connections": 2},
            shaping={"warmup": [{"start": today, "days": [2, 50], "match": ["dest.test"]}]})
    two_delivered_then_restarted(a, receiver)
    send_mail(a.port, "app@sender.test", ["late@dest.test"])
    [item] = a.wait_for_queue(lambda q: len(q) == 1 and q[0]["attempts"] >= 1, what="the third deferred")
    reply = item["recipients"][0]["last_reply"]
    assert "warm-up of" in reply and "2 messages today (day 1 of 2) to dest.test reached" in reply, reply
    assert reply.startswith("451") and len(receiver.messages) == 2
