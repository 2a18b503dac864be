"""Traffic shaping: how hard each destination may be pushed, and how much a day.

Rules match recipient domains (``gmail.com``, ``*.example.com``) or the
MX hosts mail is handed to (``mx:*.google.com``: every domain hosted there
then shares one budget, learnt at its first connection), and may cap
connections, messages per connection and messages per minute.  Where
several patterns match, the most specific wins (``mta.domains``: exact,
then the nearest ``*.parent``).  Every destination also adapts: a throttle
reply (code ``421``, or a 4xx with an enhanced code ``4.7.x``) halves its
connection allowance and sets a cool-down that doubles while throttling
continues (``mta.scheduler.backoff``, spread by the retries' jitter); each
later success earns the allowance back one step at a time.  Replies
arrive typed (``mta.replies.Reply``), so this reads their codes, not their
text.  The per-egress-address daily cap counts delivered
messages per UTC day, for warming up a new IP; a warm-up schedule
(``shaping.warmup``) makes that cap grow day by day from its start date, for
all mail or, with ``match``, for one mailbox provider's, whose mail then
waits on its own (deferred, with the schedule's day and cap as the reason).

What must hold for the whole deployment goes through the limits store
(``mta.limits``: in this process, or shared by every pod in Redis): each
delivery connection holds a lease on one of its destination's
``max_connections`` slots, renewed while it lives (``lease``), messages a
minute are taken from a shared window before each message (``rate_wait``),
and the daily cap counts under the egress address's name.  The adaptive
part — the allowance a throttle reply halves and its cool-down — stays
with each pod: it reacts to what that pod was told.

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
import datetime as dt
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from mta.config import RouteConfig, ShapingConfig, ShapingRule, WarmupSchedule
from mta.domains import DomainMap
from mta.limits.store import LimitsStore, LocalStore
from mta.replies import Reply
from mta.scheduler.backoff import retry_delay
from mta.sliding_window import SlidingWindow

MIN_COOLDOWN, MAX_COOLDOWN = 30.0, 900.0
RATE_WINDOW = 60.0  # messages_per_minute
MX_PREFIX = "mx:"
DAY = 86400.0


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
    throttles: int = 0  # throttle replies in a row: the cool-down doubles with each
    blocked_until: float = 0.0
    quotas: list[Quota] = field(default_factory=list)
    throttle_texts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.allowance = self.max_connections


class Shaper:
    def __init__(self, config: ShapingConfig, default_connections: int, default_per_connection: int,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 routes: list[RouteConfig] | None = None, store: LimitsStore | None = None,
                 egress: str = "default", lease_ttl: float = 30.0, jitter: float = 0.0,
                 rng: random.Random | None = None) -> None:
        self.jitter, self.rng = jitter, rng or random.Random()
        self.config = config
        self.store: LimitsStore = store or LocalStore(clock)
        self.egress = egress  # the daily cap's name: the address receivers see, or this host's name
        self.lease_ttl = lease_ttl
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
        # Where one pattern appears in two rules, the first rule keeps it.
        self._domain_rules: DomainMap[ShapingRule] = DomainMap(
            (pattern, rule) for rule in config.rules for pattern in rule.match if not pattern.startswith(MX_PREFIX))
        self._mx_patterns: DomainMap[str] = DomainMap(
            (pattern.removeprefix(MX_PREFIX), pattern) for rule in config.rules for pattern in rule.match
            if pattern.startswith(MX_PREFIX))
        self._overall = next((w for w in config.warmup if not w.match), None)
        # One provider's schedule: (its recipient domains, its MX hosts, the schedule).
        self._providers = [
            (DomainMap((p, True) for p in w.match if not p.startswith(MX_PREFIX)),
             DomainMap((p.removeprefix(MX_PREFIX), True) for p in w.match if p.startswith(MX_PREFIX)), w)
            for w in config.warmup if w.match]
        self._mx_hosts: dict[str, str] = {}  # destination -> the MX host its mail last went to

    def _rule(self, name: str) -> ShapingRule | None:
        if name.startswith(MX_PREFIX):
            # A budget shared through an MX pattern: the rule naming that very pattern.
            return next((r for r in self.config.rules if name in r.match), None)
        return self._domain_rules.lookup(name)

    def learn_mx(self, destination: str, mx_host: str) -> None:
        """``destination``'s mail went to ``mx_host``: share an MX rule's budget from now on."""
        if self._providers:
            self._mx_hosts[destination] = mx_host
        if destination in self._alias or self._rule(destination) is not None:
            return  # a rule for the domain itself wins
        pattern = self._mx_patterns.lookup(mx_host)
        if pattern is not None:
            self._alias[destination] = pattern

    def key(self, destination: str) -> str:
        """The name ``destination``'s budget is kept under: its own, or an MX rule's it shares."""
        return self._alias.get(destination, destination)

    def state(self, destination: str) -> DestinationState:
        key = self.key(destination)
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
        """Seconds until the next message may go to ``destination`` for this
        pod's reasons: a cool-down, or a route's quota (``rate_wait`` asks the rest)."""
        state = self.state(destination)
        now = self.clock()
        if now < state.blocked_until:
            return state.blocked_until - now
        return max((quota.wait(now) for quota in state.quotas), default=0.0)

    async def rate_wait(self, destination: str) -> float:
        """0, and one message counted against ``destination``'s messages a
        minute; or the seconds until the deployment may send it another."""
        state = self.state(destination)
        if state.messages_per_minute is None:
            return 0.0
        return await self.store.take(f"rate:{self.key(destination)}", state.messages_per_minute, RATE_WINDOW)

    async def lease(self, destination: str, holder: str) -> bool:
        """Take (or renew) one of ``destination``'s connection slots for
        ``holder``; False when the deployment holds them all."""
        return await self.store.lease(f"conn:{self.key(destination)}", holder,
                                      self.state(destination).allowance, self.lease_ttl)

    async def release(self, destination: str, holder: str) -> None:
        await self.store.release(f"conn:{self.key(destination)}", holder)

    async def hold_back(self, destination: str, label: str) -> tuple[str | None, float]:
        """Before the next message: (why every job waits for a later round, or None; seconds to pause first)."""
        warmup = await self.warmup_reached(destination)
        if warmup is not None:
            return warmup, 0.0
        pause = self.wait(destination) or await self.rate_wait(destination)
        if pause > 60:  # too long to hold a connection and a slot for
            return self.quota_reached(destination) or f"{label} asked to slow down", 0.0
        return None, pause

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

    async def sent(self, destination: str, reply: Reply, delivered: bool) -> bool:
        """Record one transaction and the server's ``reply`` to it; True when
        the reply was a throttle."""
        state = self.state(destination)
        now = self.clock()
        if delivered:
            if self.config.daily_cap is not None or self._overall is not None:
                await self.store.add(self._daily_key(), 2 * DAY)
            for schedule in self._schedules_for(destination):
                await self.store.add(self._warmup_key(schedule), 2 * DAY)
        if is_throttle_reply(reply, state.throttle_texts):
            state.allowance = max(1, state.allowance // 2)
            state.throttles += 1
            # The retries' own back-off: doubling, capped, and spread so pods do not return together.
            state.blocked_until = now + retry_delay(state.throttles, MIN_COOLDOWN, MAX_COOLDOWN, self.jitter,
                                                    self.rng)
            return True
        if delivered:
            state.throttles = 0
            state.allowance = min(state.max_connections, state.allowance + 1)
        return False

    def _today(self) -> dt.date:
        return dt.datetime.fromtimestamp(self.wall(), dt.UTC).date()

    def _daily_key(self) -> str:
        return f"daily:{self.egress}:{self._today().isoformat()}"

    def _warmup_key(self, schedule: WarmupSchedule) -> str:
        return f"warmup:{self.egress}:{','.join(schedule.match)}:{self._today().isoformat()}"

    def _schedules_for(self, destination: str) -> list[WarmupSchedule]:
        mx_host = self._mx_hosts.get(destination)
        return [schedule for domains, mx_hosts, schedule in self._providers
                if domains.lookup(destination) or (mx_host is not None and mx_hosts.lookup(mx_host))]

    def daily_cap(self) -> int | None:
        """What the egress address may send today: ``daily_cap``, or the overall warm-up's cap of the day."""
        caps = [cap for cap in (self.config.daily_cap, self._overall and self._overall.cap(self._today()))
                if cap is not None]
        return min(caps) if caps else None

    async def daily_cap_reached(self) -> bool:
        cap = self.daily_cap()
        if cap is None:
            return False
        return await self.store.get(self._daily_key()) >= self.store.share(cap)

    async def warmup_reached(self, destination: str) -> str | None:
        """Why ``destination``'s mail waits for tomorrow (a provider's warm-up cap of the day), or None."""
        if not self._providers:
            return None  # the common case: nothing to look up for any message
        today = self._today()
        for schedule in self._schedules_for(destination):
            cap = schedule.cap(today)
            if cap is not None and await self.store.get(self._warmup_key(schedule)) >= self.store.share(cap):
                day = (today - schedule.start).days + 1
                return (f"warm-up of {self.egress}: {cap} messages today (day {day} of {len(schedule.days)}) "
                        f"to {', '.join(schedule.match)} reached; it waits for the next UTC day")
        return None
