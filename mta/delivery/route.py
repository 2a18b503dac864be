"""Routing: which next hop takes mail for a recipient domain.

A next hop is either the domain's own MX hosts (direct delivery) or a smart
host from ``routes``.  Exact domains win over ``*.parent`` wildcards, which
win over the default ``*``; a domain no route names goes direct.
Failure: none; routes were validated with the config.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mta.config import RouteConfig


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
        self._exact: dict[str, RouteConfig] = {}
        self._wild: dict[str, RouteConfig] = {}
        self._default: RouteConfig | None = None
        for route in routes:
            for domain in route.domains:
                if domain == "*":
                    self._default = route
                elif domain.startswith("*."):
                    self._wild[domain[2:]] = route
                else:
                    self._exact[domain] = route

    def _route_for(self, domain: str) -> RouteConfig | None:
        domain = domain.lower().rstrip(".")
        if domain in self._exact:
            return self._exact[domain]
        parts = domain.split(".")
        for i in range(1, len(parts)):
            parent = ".".join(parts[i:])
            if parent in self._wild:
                return self._wild[parent]
        return self._default

    def next_hop(self, domain: str) -> NextHop:
        route = self._route_for(domain)
        if route is None:
            return NextHop("mx", domain.lower().rstrip("."))
        host, port = route.relay_host_port
        return NextHop("relay", f"{host}:{port}", route)
