"""Which next hop a route's mail takes: its route, or while the route is down a fallback.

Every route with a ``fallback`` has a circuit breaker (``mta.scheduler.breaker``).  While
it is open, the route's mail goes to the first of its fallbacks (``mta.delivery.route``)
that is not itself open and may take the message: ``direct`` takes only mail whose
envelope sender's domain, or a parent of it, has a DKIM key (it must leave signed as its
own domain, not as the provider's); other mail waits for its route, as without a
fallback.  The scheduler reports each attempt (``count``); when a breaker opens or
closes it is logged (``route_breaker_opened``/``_closed``) and the scheduler is told, so
that mail waiting out a retry for that route moves at once.

Failure: none; it only decides.
"""

from __future__ import annotations

import logging

from mta.config import Config
from mta.delivery.courier import Report
from mta.delivery.route import NextHop, Router
from mta.domains import DomainMap
from mta.obs.log import event
from mta.scheduler.breaker import OPEN, Breaker, is_failure
from spool import Record


class Failover:
    def __init__(self, config: Config, router: Router) -> None:
        self.router = router
        self.breakers = {route.label: Breaker(route.breaker) for route in config.routes if route.fallback}
        # A key signs for its domain and every name below it (as mta.dkim.signer chooses keys).
        self._signed: DomainMap[bool] = DomainMap(
            (pattern, True) for key in config.dkim.keys for pattern in (key.domain, f"*.{key.domain}"))

    def next_hop(self, hop: NextHop, domain: str, sender: str, asked: dict[str, bool]) -> NextHop:
        """``hop``, or while its route's breaker is open the first of its fallbacks that may take
        the mail.  ``asked``: one dispatch's answers, so a half-open breaker's probe is one message."""
        if not self._is_open(hop, asked):
            return hop
        for candidate in self.router.fallbacks(hop, domain):
            if candidate.kind == "mx" and not self._signed.lookup(sender.rpartition("@")[2]):
                continue  # its domain's SPF and DKIM are set up for the provider, not for us
            if not self._is_open(candidate, asked):
                return candidate
        return hop  # nowhere else to go: it waits for its route, as without a fallback

    def _is_open(self, hop: NextHop, asked: dict[str, bool]) -> bool:
        route = hop.route
        breaker = self.breakers.get(route.label) if route is not None else None
        if breaker is None or route is None:
            return False
        if route.label not in asked:
            asked[route.label] = not breaker.allows()
        return asked[route.label]

    def count(self, hop: NextHop, report: Report, jobs: int) -> str | None:
        """How an attempt (and ``jobs`` deferred with it) went; the label of a route whose breaker
        just opened, else None."""
        route = hop.route
        breaker = self.breakers.get(route.label) if route is not None else None
        if breaker is None or route is None:
            return None
        first = next(iter(report.outcomes.values()), None)
        entered = breaker.record(is_failure(first, report.reached, tuple(route.throttle_texts)), jobs)
        if entered is None:
            return None
        event("route_breaker_" + ("opened" if entered == OPEN else "closed"), level=logging.WARNING,
              route=route.label, relay=hop.name, fallback=",".join(route.fallback),
              reply=str(first.reply) if first is not None else None)
        return route.label if entered == OPEN else None

    def routed_by(self, record: Record, label: str) -> bool:
        """Whether some pending recipient of ``record`` is mail of the route ``label``."""
        for rcpt in record.pending():
            route = self.router.next_hop(rcpt.address.rpartition("@")[2]).route
            if route is not None and route.label == label:
                return True
        return False
