"""The one retry schedule, as the mail queue and the webhook sender use it."""

from __future__ import annotations

import random

from mta.scheduler.backoff import retry_delay


def test_the_floor_is_one_second_unless_asked_otherwise() -> None:
    rng = random.Random(1)
    assert retry_delay(1, 0.1, 10, 0.0, rng) == 1.0
    assert retry_delay(1, 0.1, 10, 0.0, rng, floor=0.05) == 0.1
    assert retry_delay(1, 0.01, 10, 0.0, rng, floor=0.05) == 0.05


def test_webhook_retries_double_to_their_cap_with_jitter() -> None:
    delays = [retry_delay(n, 0.5, 4, 0.2, random.Random(n), floor=0.05) for n in range(1, 7)]
    assert 0.4 <= delays[0] <= 0.6 and 0.8 <= delays[1] <= 1.2 and 1.6 <= delays[2] <= 2.4
    assert all(3.2 <= d <= 4.8 for d in delays[3:])
