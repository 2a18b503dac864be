"""A circuit breaker per route: when a relay counts as down, and when to try it again.

Closed, a route takes its mail and every attempt is counted, as a success
or a failure, over the last ``window`` seconds.  At least ``min_attempts``
of which ``failure_ratio`` or more failed open it: its mail goes to its
fallback (``mta.delivery.route``) at once.  After ``cooldown`` it is
half-open: the next message probes it (one at a time); a success closes
it, a failure opens it for another cooldown.  What counts as a failure is
the scheduler's to say (``is_failure``): the relay could not be reached, no
server answered (our own wording: a refused connection, a TLS failure), or
it answered "unavailable" or "slow down" (421, 454, 4.7.x, a provider's
throttling texts).  A recipient the provider refuses is a success: the
provider is up.

Failure: none; it only counts.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from mta.config import BreakerConfig
from mta.delivery.result import Kind, Outcome
from mta.scheduler.shaping import is_throttle_reply

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"
MAX_ATTEMPTS = 10_000


def is_failure(outcome: Outcome | None, reached: bool, texts: tuple[str, ...] = ()) -> bool:
    """Whether one attempt's (first) outcome says the route is down or throttling."""
    if not reached or outcome is None:
        return True
    if outcome.kind is not Kind.TRANSIENT:
        return False
    return not outcome.answered or outcome.reply.code in (421, 454) or is_throttle_reply(outcome.reply, texts)


class Breaker:
    def __init__(self, config: BreakerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.state = CLOSED
        # (when, failed); at most the last MAX_ATTEMPTS of the window, to bound memory at high rates
        self._attempts: deque[tuple[float, bool]] = deque(maxlen=MAX_ATTEMPTS)
        self._opened = 0.0
        self._probing_since: float | None = None

    def allows(self) -> bool:
        """May mail go to the route now?  Half-open, this claims the one probe."""
        now = self.clock()
        if self.state == OPEN and now - self._opened >= self.config.cooldown:
            self.state = HALF_OPEN
        if self.state != HALF_OPEN:
            return self.state == CLOSED
        # A probe that never reports (the pod stopped it) does not hold the route shut for ever.
        if self._probing_since is None or now - self._probing_since >= self.config.cooldown:
            self._probing_since = now
            return True
        return False

    def record(self, failed: bool, count: int = 1) -> str | None:
        """``count`` attempts that failed or not; the state entered when it changed ("open", "closed")."""
        now = self.clock()
        if self.state == HALF_OPEN:
            self._probing_since = None
            self._attempts.clear()
            if failed:
                self.state, self._opened = OPEN, now
                return OPEN
            self.state = CLOSED
            return CLOSED
        if self.state == OPEN:
            return None  # a delivery that started before it opened
        self._attempts.extend([(now, failed)] * count)
        while self._attempts and now - self._attempts[0][0] > self.config.window:
            self._attempts.popleft()
        failures = sum(1 for _, bad in self._attempts if bad)
        if len(self._attempts) >= self.config.min_attempts and \
                failures >= self.config.failure_ratio * len(self._attempts):
            self.state, self._opened = OPEN, now
            self._attempts.clear()
            return OPEN
        return None
