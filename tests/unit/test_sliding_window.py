"""The sliding-window counter, and the AUTH throttle and account rates built on it."""

from __future__ import annotations

import asyncio

import pytest

from mta import replies
from mta.auth.throttle import Throttle
from mta.config import AccountPolicy
from mta.policy.account import RateLimits
from mta.replies import Rejected
from mta.sliding_window import SlidingWindow


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_events_count_for_span_seconds_then_leave() -> None:
    window = SlidingWindow(60)
    window.add(1000)
    window.add(1030)
    assert window.count(1030) == 2 and window.oldest_leaves_in(1030) == 30
    assert window.count(1060) == 2  # an event counts up to and including span seconds later
    assert window.count(1060.5) == 1 and window.oldest_leaves_in(1060.5) == 29.5
    assert window.count(1091) == 0 and window.oldest_leaves_in(1091) == 0


def test_weights_add_up_and_leave_with_their_event() -> None:
    window = SlidingWindow(10)
    window.add(0)
    window.add(5, weight=4)
    window.add(6)
    assert window.count(6) == 3 and window.total(6) == 6
    assert window.total(10) == 6 and window.total(11) == 5
    assert window.total(15.5) == 1 and window.total(16.5) == 0


def test_max_events_keeps_only_the_newest() -> None:
    window = SlidingWindow(100, max_events=3)
    for t in range(10):
        window.add(t, weight=2)
    assert window.count(10) == 3 and window.total(10) == 6
    assert window.oldest_leaves_in(10) == 97  # the oldest kept is the one at 7


def test_throttle_locks_out_until_the_oldest_failure_leaves() -> None:
    clock = Clock()
    throttle = Throttle(max_failures=3, window=60, clock=clock)
    for _ in range(3):
        assert not asyncio.run(throttle.blocked("ip:192.0.2.1"))
        asyncio.run(throttle.fail("ip:192.0.2.1"))
        clock.now += 10
    assert asyncio.run(throttle.blocked("ip:192.0.2.1")) and not asyncio.run(throttle.blocked("user:app"))
    clock.now = 1060  # the first failure is exactly one window old: still counted
    assert asyncio.run(throttle.blocked("ip:192.0.2.1"))
    clock.now = 1060.1
    assert not asyncio.run(throttle.blocked("ip:192.0.2.1"))
    asyncio.run(throttle.fail("ip:192.0.2.1"))
    assert asyncio.run(throttle.blocked("ip:192.0.2.1"))
    asyncio.run(throttle.succeed("ip:192.0.2.1"))
    assert not asyncio.run(throttle.blocked("ip:192.0.2.1"))


def test_account_rates_count_messages_a_minute_and_recipients_a_day() -> None:
    clock = Clock()
    rates = RateLimits(clock)
    policy = AccountPolicy(messages_per_minute=2, recipients_per_day=5)
    for session in ("s1", "s2"):
        asyncio.run(rates.hold_message(policy, "app", session))
        asyncio.run(rates.hold_recipients(policy, "app", session, 2))
        asyncio.run(rates.commit(session, 2))
    with pytest.raises(Rejected) as refused:
        asyncio.run(rates.hold_message(policy, "app", "s3"))
    assert refused.value.reply == replies.RATE_MESSAGES
    asyncio.run(rates.hold_message(policy, "other", "s4"))
    clock.now += 61
    asyncio.run(rates.hold_message(policy, "app", "s3"))
    asyncio.run(rates.hold_recipients(policy, "app", "s3", 1))
    with pytest.raises(Rejected) as refused:
        asyncio.run(rates.hold_recipients(policy, "app", "s3", 2))
    assert refused.value.reply == replies.RATE_RECIPIENTS
    rates.release("s3")
    clock.now += 86400
    asyncio.run(rates.hold_message(policy, "app", "s3"))
    asyncio.run(rates.hold_recipients(policy, "app", "s3", 5))


def test_account_reservations_count_for_parallel_transactions_until_released() -> None:
    clock = Clock()
    rates = RateLimits(clock)
    policy = AccountPolicy(messages_per_minute=3, recipients_per_day=4)
    for session in ("a", "b", "c"):  # three transactions open at once, none finished
        asyncio.run(rates.hold_message(policy, "app", session))
    with pytest.raises(Rejected):
        asyncio.run(rates.hold_message(policy, "app", "d"))
    asyncio.run(rates.hold_recipients(policy, "app", "a", 2))
    asyncio.run(rates.hold_recipients(policy, "app", "b", 2))
    asyncio.run(rates.hold_recipients(policy, "app", "b", 2))  # a repeated RCPT count holds nothing more
    with pytest.raises(Rejected) as refused:
        asyncio.run(rates.hold_recipients(policy, "app", "c", 1))
    assert refused.value.reply == replies.RATE_RECIPIENTS
    assert rates.held("app") == (3, 4)
    rates.release("b")  # RSET, or a disconnect
    rates.release("b")  # twice is harmless
    assert rates.held("app") == (2, 2)
    asyncio.run(rates.hold_message(policy, "app", "d"))
    asyncio.run(rates.hold_recipients(policy, "app", "c", 2))
    asyncio.run(rates.commit("a", 2))
    asyncio.run(rates.commit("a", 2))  # committed once only
    rates.release("c")
    rates.release("d")
    assert rates.held("app") == (0, 0)
    assert rates._held_messages == {} and rates._held_recipients == {}  # nothing left per user
    asyncio.run(rates.hold_message(policy, "app", "e"))
    asyncio.run(rates.hold_message(policy, "app", "f"))
    with pytest.raises(Rejected):  # one committed + two held
        asyncio.run(rates.hold_message(policy, "app", "g"))
    with pytest.raises(Rejected):  # the day's recipients: two committed, room for two
        asyncio.run(rates.hold_recipients(policy, "app", "e", 3))
    clock.now += 61
    asyncio.run(rates.hold_message(policy, "app", "g"))
