"""Routing: which next hop takes mail for a recipient domain.

A next hop is either the domain's own MX hosts (direct delivery) or a smart
host from ``routes``, with the TLS settings and login of its route.  Exact
domains win over ``*.parent`` wildcards, which win over the default ``*``
(``mta.domains``); a domain no route names goes direct.  ``fallbacks`` are
the next hops a route's mail may take instead, in the order its
``fallback`` names them (``mta.scheduler.breaker`` says when).
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
    # Part of the key: routes naming one relay with other TLS settings or
    # another login must never share a connection.
    session: tuple[str, ...] = ()
    # Not part of the key (a route holds lists, unhashable); ``session`` stands for it.
    route: RouteConfig | None = field(default=None, compare=False, hash=False)

    def __str__(self) -> str:
        return self.name if self.kind == "mx" else f"relay {self.name}"


DIRECT = "direct"


class Router:
    def __init__(self, routes: list[RouteConfig]) -> None:
        self._routes: DomainMap[RouteConfig] = DomainMap(
            (domain, route) for route in routes for domain in route.domains)
        self._named = {route.name: route for route in routes if route.name}

    def next_hop(self, domain: str) -> NextHop:
        route = self._routes.lookup(domain)
        if route is None:
            return NextHop("mx", normalise(domain))
        return self.relay(route)

    def fallbacks(self, hop: NextHop, domain: str) -> list[NextHop]:
        """Where ``hop``'s mail for ``domain`` may go instead, in order."""
        if hop.route is None:
            return []
        return [NextHop("mx", normalise(domain)) if name == DIRECT else self.relay(self._named[name])
                for name in hop.route.fallback]

    @staticmethod
    def relay(route: RouteConfig) -> NextHop:
        host, port = route.relay_host_port
        session = (route.tls, str(route.tls_verify), str(route.ca_file or ""), str(route.auth_file or ""),
                   route.auth_user or "")
        return NextHop("relay", f"{host}:{port}", session, route)
