"""The route circuit breaker's states: closed, open past the failure ratio, half-open after the cool-down."""

from __future__ import annotations

from mta.config import BreakerConfig
from mta.delivery import result
from mta.replies import Reply
from mta.scheduler.breaker import CLOSED, HALF_OPEN, OPEN, Breaker, is_failure


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_it_opens_past_the_ratio_probes_after_the_cooldown_and_closes_on_success() -> None:
    clock = Clock()
    breaker = Breaker(BreakerConfig(failure_ratio=0.5, min_attempts=4, window=60, cooldown=30), clock)
    assert breaker.record(False) is None and breaker.record(True) is None and breaker.record(False) is None
    assert breaker.allows()
    assert breaker.record(True) is OPEN  # 2 of 4 failed
    assert not breaker.allows() and breaker.state == OPEN
    clock.now += 30
    assert breaker.allows() and breaker.state == HALF_OPEN  # the probe
    assert not breaker.allows()  # one probe at a time
    assert breaker.record(True) == OPEN  # the probe failed: another cool-down
    assert not breaker.allows()
    clock.now += 30
    assert breaker.allows()
    assert breaker.record(False) == CLOSED and breaker.allows()


def test_old_attempts_leave_the_window_and_a_lost_probe_is_retried() -> None:
    clock = Clock()
    breaker = Breaker(BreakerConfig(failure_ratio=0.5, min_attempts=2, window=60, cooldown=30), clock)
    breaker.record(True)
    clock.now += 61
    assert breaker.record(False) is None  # the failure a minute ago no longer counts: 0 of 1
    assert breaker.record(True, count=3) == OPEN  # one attempt that deferred two more with it
    clock.now += 30
    assert breaker.allows() and not breaker.allows()
    clock.now += 30  # the probe never reported (its pod stopped): another may go
    assert breaker.allows()


def test_what_counts_as_the_route_being_down() -> None:
    refused = result.transient(451, "4.4.1", "connection refused")  # our wording: no server answered
    throttled = result.Outcome(result.Kind.TRANSIENT, Reply(454, "4.7.0", "Throttling failure"), answered=True)
    busy = result.Outcome(result.Kind.TRANSIENT, Reply(450, "4.2.1", "mailbox busy"), answered=True)
    unknown = result.Outcome(result.Kind.PERMANENT, Reply(550, "5.1.1", "no such user"), answered=True)
    assert is_failure(refused, reached=False) and is_failure(refused, reached=True)
    assert is_failure(throttled, reached=True)
    assert is_failure(result.Outcome(result.Kind.TRANSIENT, Reply(451, "", "Daily sending quota exceeded"),
                                     answered=True), True, ("sending quota exceeded",))
    assert not is_failure(busy, reached=True) and not is_failure(unknown, reached=True)
