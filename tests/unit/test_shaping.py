"""Traffic shaping arithmetic: rules, throttle back-off and recovery, rates, daily cap."""

from __future__ import annotations

import asyncio
import datetime as dt
import random

from mta.config import RouteConfig, ShapingConfig, ShapingRule, WarmupSchedule
from mta.replies import Reply
from mta.scheduler.shaping import MIN_COOLDOWN, Shaper, is_throttle_reply

OK = Reply(250, "", "ok")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(coroutine: object) -> object:
    return asyncio.run(coroutine)  # type: ignore[arg-type]


def sent(s: Shaper, destination: str, reply: Reply, delivered: bool) -> bool:
    return bool(run(s.sent(destination, reply, delivered)))


def shaper(clock: Clock, **config: object) -> Shaper:
    return Shaper(ShapingConfig(**config), 10, 100, clock=clock, wall=lambda: 86400 * 20000 + clock.now)


def test_rules_match_domains_and_cap_below_the_defaults() -> None:
    clock = Clock()
    s = shaper(clock, rules=[ShapingRule(match=["gmail.com", "*.outlook.com"], max_connections=2,
                                         messages_per_connection=5, messages_per_minute=3)])
    assert s.connections("gmail.com") == 2 and s.state("gmail.com").messages_per_connection == 5
    assert s.connections("eu.outlook.com") == 2
    assert s.connections("example.net") == 10 and s.state("example.net").messages_per_connection == 100


def test_throttle_replies_halve_and_cool_down_then_recover() -> None:
    clock = Clock()
    s = shaper(clock)
    assert is_throttle_reply(Reply(421, "4.7.0", "Try again later")) and \
        is_throttle_reply(Reply(450, "4.7.28", "rate limited"))
    assert not is_throttle_reply(Reply(450, "4.2.0", "mailbox busy")) and \
        not is_throttle_reply(Reply(550, "5.7.1", "no"))
    assert sent(s, "big.example", Reply(421, "4.7.0", "slow down"), delivered=False)
    assert s.connections("big.example") == 0 and s.wait("big.example") == MIN_COOLDOWN
    clock.now += MIN_COOLDOWN
    assert s.connections("big.example") == 5
    sent(s, "big.example", Reply(421, "", "too fast"), delivered=False)
    assert s.wait("big.example") == 2 * MIN_COOLDOWN  # the cool-down doubles
    clock.now += 2 * MIN_COOLDOWN
    for _ in range(10):
        sent(s, "big.example", Reply(250, "2.0.0", "ok"), delivered=True)
    assert s.connections("big.example") == 10


def test_messages_per_minute() -> None:
    clock = Clock()
    s = shaper(clock, rules=[ShapingRule(match=["slow.example"], messages_per_minute=2)])
    for _ in range(2):
        assert run(s.rate_wait("slow.example")) == 0  # and counted
    assert run(s.rate_wait("slow.example")) == 60
    clock.now += 30
    assert run(s.rate_wait("slow.example")) == 30
    clock.now += 30.01  # an event counts while it is at most a minute old
    assert run(s.rate_wait("slow.example")) == 0


def test_daily_cap_counts_deliveries_per_day() -> None:
    clock = Clock()
    s = shaper(clock, daily_cap=2)
    sent(s, "a.example", OK, delivered=True)
    assert not run(s.daily_cap_reached())
    sent(s, "a.example", Reply(550, "", "no"), delivered=False)
    sent(s, "b.example", OK, delivered=True)
    assert run(s.daily_cap_reached())
    clock.now += 86400
    assert not run(s.daily_cap_reached())


def test_domains_on_one_mx_share_its_rule_once_learnt() -> None:
    clock = Clock()
    s = shaper(clock, rules=[ShapingRule(match=["mx:*.google.test"], max_connections=2, messages_per_minute=3)])
    assert s.connections("a.example") == 10  # not known yet
    s.learn_mx("a.example", "aspmx.l.google.test")
    s.learn_mx("b.example", "alt1.aspmx.l.google.test")
    s.learn_mx("c.example", "mx.elsewhere.test")
    assert s.connections("a.example") == 2 and s.connections("c.example") == 10
    for _ in range(2):
        assert run(s.rate_wait("a.example")) == 0
    assert run(s.rate_wait("b.example")) == 0
    assert run(s.rate_wait("a.example")) == 60 and run(s.rate_wait("b.example")) == 60  # one budget for both


def test_throttle_is_read_from_the_code_not_the_text() -> None:
    assert is_throttle_reply(Reply(421, "", "Service not available"))
    assert not is_throttle_reply(Reply(451, "4.3.0", "local error, 4.7.0 mentioned in the text"))
    assert not is_throttle_reply(Reply(250, "2.0.0", "4.7.1 ok"))


def test_the_most_specific_pattern_wins_whatever_the_rule_order() -> None:
    clock = Clock()
    s = shaper(clock, rules=[ShapingRule(match=["*.example.com"], max_connections=2),
                             ShapingRule(match=["*.eu.example.com"], max_connections=3),
                             ShapingRule(match=["mail.eu.example.com", "mx:*.hoster.test"], max_connections=4),
                             ShapingRule(match=["mx:*.big.hoster.test"], max_connections=5)])
    assert s.connections("a.example.com") == 2
    assert s.connections("a.eu.example.com") == 3
    assert s.connections("Mail.EU.example.com.") == 4
    assert s.connections("example.com") == 10  # "*.example.com" covers only names below it
    s.learn_mx("x.example", "mx1.hoster.test")
    s.learn_mx("y.example", "mx1.big.hoster.test.")
    assert s.connections("x.example") == 4 and s.connections("y.example") == 5


def quota_shaper(clock: Clock, **route: object) -> Shaper:
    return Shaper(ShapingConfig(), 10, 100, clock=clock, wall=lambda: 86400 * 20000 + clock.now,
                  routes=[RouteConfig(domains=["*"], relay="esp.example:587", **route)])


def test_a_route_quota_counts_messages_in_flight_and_for_a_window_after_they_end() -> None:
    clock = Clock()
    s = quota_shaper(clock, messages_per_second=2)
    assert s.wait("esp.example:587") == 0 and s.wait("other.example:587") == 0
    with s.admitted("esp.example:587"), s.admitted("esp.example:587"):
        assert s.wait("esp.example:587") > 0  # two under way fill a quota of 2
        clock.now += 5  # a slow transaction still counts, however old
        assert s.wait("esp.example:587") > 0
    assert s.wait("esp.example:587") == 1.0  # ended now: they count one more second
    assert "quota of 2 messages a second reached" in (s.quota_reached("esp.example:587") or "")
    clock.now += 1.01
    assert s.wait("esp.example:587") == 0 and s.quota_reached("esp.example:587") is None
    assert s.wait("other.example:587") == 0  # another relay has no quota


def test_the_tightest_of_a_routes_quotas_decides() -> None:
    clock = Clock()
    s = quota_shaper(clock, messages_per_second=10, messages_per_day=3)
    for _ in range(3):
        with s.admitted("esp.example:587"):
            clock.now += 0.1
    assert s.wait("esp.example:587") > 86000
    assert "quota of 3 messages a day reached" in (s.quota_reached("esp.example:587") or "")
    clock.now += 86400
    assert s.wait("esp.example:587") == 0


def test_a_providers_throttling_text_backs_off_whatever_its_code() -> None:
    clock = Clock()
    s = quota_shaper(clock, throttle_texts=["Maximum sending rate exceeded"])
    assert sent(s, "esp.example:587", Reply(454, "", "Throttling failure: Maximum sending rate exceeded"), False)
    assert s.connections("esp.example:587") == 0
    assert not sent(s, "other.example:587", Reply(454, "", "Throttling failure: Maximum sending rate exceeded"),
                      False)


def test_warmup_caps_grow_day_by_day_overall_and_per_provider() -> None:
    clock = Clock()
    day0 = dt.datetime.fromtimestamp(86400 * 20000 + clock.now, dt.UTC).date()
    s = shaper(clock, warmup=[WarmupSchedule(start=day0, days=[3, 5]),
                              WarmupSchedule(start=day0, days=[1, 2], match=["gmail.test", "mx:*.google.test"])])
    assert s.daily_cap() == 3
    assert run(s.warmup_reached("gmail.test")) is None
    sent(s, "gmail.test", OK, delivered=True)
    reason = run(s.warmup_reached("gmail.test"))
    assert reason and "1 messages today (day 1 of 2) to gmail.test, mx:*.google.test reached" in str(reason)
    assert run(s.warmup_reached("other.test")) is None  # another provider's mail is not held
    s.learn_mx("hosted.test", "aspmx.l.google.test")  # a domain Google hosts counts as Google's
    assert run(s.warmup_reached("hosted.test")) is not None
    sent(s, "other.test", OK, delivered=True)
    sent(s, "other.test", OK, delivered=True)
    assert run(s.daily_cap_reached())  # 3 overall on day 1
    clock.now += 86400
    assert s.daily_cap() == 5 and not run(s.daily_cap_reached())
    assert run(s.warmup_reached("gmail.test")) is None
    clock.now += 86400
    assert s.daily_cap() is None and run(s.warmup_reached("gmail.test")) is None  # the schedule is over


def test_the_throttle_cool_down_is_spread_by_the_retries_jitter() -> None:
    clock = Clock()
    waits = set()
    for seed in range(20):
        s = Shaper(ShapingConfig(), 10, 100, clock=clock, jitter=0.2, rng=random.Random(seed))
        sent(s, "big.example", Reply(421, "4.7.0", "slow down"), delivered=False)
        waits.add(round(s.wait("big.example"), 3))
    assert len(waits) > 10 and all(0.8 * MIN_COOLDOWN <= w <= 1.2 * MIN_COOLDOWN for w in waits), waits
