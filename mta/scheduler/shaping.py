"""Traffic shaping: how hard each destination may be pushed, and how much a day.

Rules match recipient domains (``gmail.com``, ``*.example.com``) or the
MX hosts mail is handed to (``mx:*.google.com``: every domain hosted there
then shares one budget, learnt at its first connection), and may cap
connections, messages per connection and messages per minute.  Where
several patterns match, the most specific wins (``mta.domains``: exact,
then the nearest ``*.parent``).  Every destination also adapts: a throttle
reply (code ``421``, or a 4xx with an enhanced code ``4.7.x``) halves its
connection allowance and sets a cool-down that doubles while throttling
continues; each later success earns the allowance back one step at a
time.  Replies arrive typed (``mta.replies.Reply``), so this reads their
codes, not their text.  The per-egress-address daily cap counts delivered
messages per UTC day, for warming up a new IP.

Routes through an email service provider add the provider's quota
(``routes[].messages_per_second/_minute/_day``, keyed by the relay's
``host:port``) and its own "slow down" reply texts.  A quota counts each
message from the moment it is admitted until its transaction ends, and
then for the window after it ended: the provider receives it somewhere in
between, so however long a transaction takes, the provider never sees more
than the quota in any window.  A burst over the quota waits for the window
(or is deferred with the quota as the reason when the wait is long); it is
never bounced.

Failure: none; it only counts and answers how long to wait.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from mta.config import RouteConfig, ShapingConfig, ShapingRule
from mta.domains import DomainMap
from mta.replies import Reply
from mta.sliding_window import SlidingWindow

MIN_COOLDOWN, MAX_COOLDOWN = 30.0, 900.0
RATE_WINDOW = 60.0  # messages_per_minute
MX_PREFIX = "mx:"


def is_throttle_reply(reply: Reply, texts: tuple[str, ...] = ()) -> bool:
    """421 (the server closes the session), or a 4xx whose enhanced code is
    4.7.x (RFC 3463's policy class, where providers put their rate limits),
    or a reply holding one of a provider's documented throttling ``texts``."""
    if reply.code == 421 or (reply.code // 100 == 4 and reply.enhanced.startswith("4.7.")):
        return True
    text = reply.text.lower()
    return any(t.lower() in text for t in texts)


QUOTA_WINDOWS = (("second", 1.0), ("minute", 60.0), ("day", 86400.0))


@dataclass
class Quota:
    """One of a route's ``messages_per_<unit>`` limits."""

    limit: int
    unit: str
    window: SlidingWindow
    in_flight: int = 0  # admitted, transaction not ended: counted whatever its age

    def wait(self, now: float) -> float:
        if self.in_flight + self.window.count(now) < self.limit:
            return 0.0
        if self.window.count(now) == 0:
            return self.window.span  # all in flight: at least until one ends and its window passes
        return max(self.window.oldest_leaves_in(now), 1e-3)


def route_quotas(route: RouteConfig) -> list[Quota]:
    limits = {"second": route.messages_per_second, "minute": route.messages_per_minute,
              "day": route.messages_per_day}
    return [Quota(limits[unit], unit, SlidingWindow(span)) for unit, span in QUOTA_WINDOWS if limits[unit]]


@dataclass
class DestinationState:
    max_connections: int
    messages_per_connection: int
    messages_per_minute: int | None
    allowance: int = 0
    cooldown: float = MIN_COOLDOWN
    blocked_until: float = 0.0
    sent: SlidingWindow = field(default_factory=lambda: SlidingWindow(RATE_WINDOW))
    quotas: list[Quota] = field(default_factory=list)
    throttle_texts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.allowance = self.max_connections


class Shaper:
    def __init__(self, config: ShapingConfig, default_connections: int, default_per_connection: int,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 routes: list[RouteConfig] | None = None) -> None:
        self.config = config
        # Relays named by more than one route share the first one's quota: hop names are host:port.
        self._routes: dict[str, RouteConfig] = {}
        for route in routes or []:
            host, port = route.relay_host_port
            self._routes.setdefault(f"{host}:{port}", route)
        self.default_connections = default_connections
        self.default_per_connection = default_per_connection
        self.clock, self.wall = clock, wall
        self._states: dict[str, DestinationState] = {}
        self._alias: dict[str, str] = {}  # destination -> "mx:<pattern>" whose budget it shares
        self._day = ""
        self._delivered_today = 0
        # Where one pattern appears in two rules, the first rule keeps it.
        self._domain_rules: DomainMap[ShapingRule] = DomainMap(
            (pattern, rule) for rule in config.rules for pattern in rule.match if not pattern.startswith(MX_PREFIX))
        self._mx_patterns: DomainMap[str] = DomainMap(
            (pattern.removeprefix(MX_PREFIX), pattern) for rule in config.rules for pattern in rule.match
            if pattern.startswith(MX_PREFIX))

    def _rule(self, name: str) -> ShapingRule | None:
        if name.startswith(MX_PREFIX):
            # A budget shared through an MX pattern: the rule naming that very pattern.
            return next((r for r in self.config.rules if name in r.match), None)
        return self._domain_rules.lookup(name)

    def learn_mx(self, destination: str, mx_host: str) -> None:
        """``destination``'s mail went to ``mx_host``: share an MX rule's budget from now on."""
        if destination in self._alias or self._rule(destination) is not None:
            return  # a rule for the domain itself wins
        pattern = self._mx_patterns.lookup(mx_host)
        if pattern is not None:
            self._alias[destination] = pattern

    def state(self, destination: str) -> DestinationState:
        key = self._alias.get(destination, destination)
        state = self._states.get(key)
        if state is None:
            rule = self._rule(key)
            state = DestinationState(
                max_connections=min(filter(None, [rule and rule.max_connections, self.default_connections])),
                messages_per_connection=min(filter(None, [rule and rule.messages_per_connection,
                                                          self.default_per_connection])),
                messages_per_minute=rule.messages_per_minute if rule else None,
            )
            route = self._routes.get(key)
            if route is not None:
                state.quotas = route_quotas(route)
                state.throttle_texts = tuple(route.throttle_texts)
            self._states[key] = state
        return state

    def connections(self, destination: str) -> int:
        """How many connections the destination may have now (0 while cooling down)."""
        state = self.state(destination)
        return 0 if self.clock() < state.blocked_until else state.allowance

    def wait(self, destination: str) -> float:
        """Seconds until the next message may go to ``destination``."""
        state = self.state(destination)
        now = self.clock()
        if now < state.blocked_until:
            return state.blocked_until - now
        quota_wait = max((quota.wait(now) for quota in state.quotas), default=0.0)
        if state.messages_per_minute is None or state.sent.count(now) < state.messages_per_minute:
            return quota_wait
        return max(quota_wait, state.sent.oldest_leaves_in(now))

    def quota_reached(self, destination: str) -> str | None:
        """The route quota holding ``destination``'s mail back now, said for
        a deferral's reply text; None when no quota is the reason."""
        state = self.state(destination)
        now = self.clock()
        full = [q for q in state.quotas if q.wait(now) > 0]
        if now < state.blocked_until or not full:
            return None
        quota = max(full, key=lambda q: q.wait(now))
        return (f"relay {destination}: quota of {quota.limit} messages a {quota.unit} reached; "
                f"next try in {round(quota.wait(now))}s or later")

    @contextlib.contextmanager
    def admitted(self, destination: str) -> Iterator[None]:
        """One message on its way to ``destination``: it counts against the
        route's quotas from now on, and for a window after it ends."""
        quotas = self.state(destination).quotas
        for quota in quotas:
            quota.in_flight += 1
        try:
            yield
        finally:
            now = self.clock()
            for quota in quotas:
                quota.in_flight -= 1
                quota.window.add(now)

    def sent(self, destination: str, reply: Reply, delivered: bool) -> bool:
        """Record one transaction and the server's ``reply`` to it; True when
        the reply was a throttle."""
        state = self.state(destination)
        now = self.clock()
        state.sent.add(now)
        if delivered:
            self._count_delivery()
        if is_throttle_reply(reply, state.throttle_texts):
            state.allowance = max(1, state.allowance // 2)
            state.blocked_until = now + state.cooldown
            state.cooldown = min(MAX_COOLDOWN, state.cooldown * 2)
            return True
        if delivered:
            state.cooldown = MIN_COOLDOWN
            state.allowance = min(state.max_connections, state.allowance + 1)
        return False

    def _roll_day(self) -> None:
        today = time.strftime("%Y-%m-%d", time.gmtime(self.wall()))
        if today != self._day:
            self._day, self._delivered_today = today, 0

    def _count_delivery(self) -> None:
        self._roll_day()
        self._delivered_today += 1

    def daily_cap_reached(self) -> bool:
        cap = self.config.daily_cap
        if cap is None:
            return False
        self._roll_day()
        return self._delivered_today >= cap
