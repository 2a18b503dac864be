"""The retry schedule: exponential backoff with jitter, capped.

With the defaults (5 minutes doubling to 1 hour, ±20 % jitter) this is close
to Postfix's ``minimal_backoff_time``/``maximal_backoff_time``; the jitter
keeps a burst of mail deferred together from retrying in lockstep.
"""

from __future__ import annotations

import random


def retry_delay(attempts: int, initial: float, maximum: float, jitter: float, rng: random.Random) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt (1-based)."""
    base = min(maximum, initial * 2 ** max(0, attempts - 1))
    spread = base * jitter
    return max(1.0, base + rng.uniform(-spread, spread))
