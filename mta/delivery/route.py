"""Routing: which next hop takes mail for a recipient domain.

A next hop is either the domain's own MX hosts (direct delivery) or a smart
host from ``routes``.  Exact domains win over ``*.parent`` wildcards, which
win over the default ``*`` (``mta.domains``); a domain no route names goes
direct.
Failure: none; routes were validated with the config.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mta.config import RouteConfig
from mta.domains import DomainMap, normalise


@dataclass(frozen=True)
class NextHop:
    """Where to connect; also the key mail is grouped by for connection reuse."""

    kind: str  # "mx" or "relay"
    name: str  # the recipient domain (mx) or "host:port" (relay)
    # Not part of the key: a route holds lists (unhashable), and one relay
    # address is one destination however many routes name it.
    route: RouteConfig | None = field(default=None, compare=False, hash=False)

    def __str__(self) -> str:
        return self.name if self.kind == "mx" else f"relay {self.name}"


class Router:
    def __init__(self, routes: list[RouteConfig]) -> None:
        self._routes: DomainMap[RouteConfig] = DomainMap(
            (domain, route) for route in routes for domain in route.domains)

    def next_hop(self, domain: str) -> NextHop:
        route = self._routes.lookup(domain)
        if route is None:
            return NextHop("mx", normalise(domain))
        host, port = route.relay_host_port
        return NextHop("relay", f"{host}:{port}", route)
