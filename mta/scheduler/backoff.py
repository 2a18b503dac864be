"""The retry schedule: exponential backoff with jitter, capped — the only one.

With the defaults (5 minutes doubling to 1 hour, ±20 % jitter) this is close
to Postfix's ``minimal_backoff_time``/``maximal_backoff_time``; the jitter
keeps a burst of mail deferred together from retrying in lockstep.  The
mail queue uses it for deliveries and ``mta.obs.webhooks`` for failed
POSTs; it imports nothing of the project, so either may.

Failure: none; it only computes.
"""

from __future__ import annotations

import random


def retry_delay(attempts: int, initial: float, maximum: float, jitter: float, rng: random.Random,
                *, floor: float = 1.0) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt (1-based).

    ``initial`` doubles with each attempt up to ``maximum``, then moves by up
    to ``±jitter`` of itself; never less than ``floor``.
    """
    base = min(maximum, initial * 2 ** max(0, attempts - 1))
    spread = base * jitter
    return max(floor, base + rng.uniform(-spread, spread))
