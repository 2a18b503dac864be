"""Where a domain's mail goes: MX hosts in preference order, and addresses.

Uses dnspython's async resolver against ``dns.nameservers`` (or the system's
when none are configured).  RFC 5321 §5.1: MX records sorted by preference,
equal preferences shuffled; no MX record means the domain's own A/AAAA
(implicit MX); a null MX (RFC 7505) or a domain that does not exist is a
permanent failure.  A DNS timeout or SERVFAIL is a transient failure.

Failure: ``LookupFailed`` with ``permanent`` set, and a typed reply.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from mta.replies import Reply


class LookupFailed(Exception):
    def __init__(self, permanent: bool, code: int, enhanced: str, text: str) -> None:
        super().__init__(text)
        self.permanent = permanent
        self.reply = Reply(code, enhanced, text)


@dataclass(frozen=True)
class MxHost:
    name: str
    preference: int


def make_resolver(nameservers: list[tuple[str, int]], timeout: float) -> dns.asyncresolver.Resolver:
    """A resolver aimed at the configured servers (the system's when empty)."""
    if nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port) for host, port in nameservers]
    else:
        resolver = dns.asyncresolver.Resolver()
    resolver.timeout = timeout
    resolver.lifetime = timeout * 2
    return resolver


class MxResolver:
    def __init__(self, resolver: dns.asyncresolver.Resolver, rng: random.Random | None = None) -> None:
        self.resolver = resolver
        self.rng = rng or random.Random()

    async def _query(self, name: str, rdtype: str) -> dns.resolver.Answer | None:
        """The answer, or None when the name exists without that type."""
        try:
            return await self.resolver.resolve(name, rdtype, search=False)
        except dns.resolver.NXDOMAIN:
            raise LookupFailed(True, 550, "5.1.2", f"domain {name} does not exist") from None
        except dns.resolver.NoAnswer:
            return None
        except (dns.resolver.NoNameservers, dns.exception.Timeout) as exc:
            raise LookupFailed(False, 451, "4.4.3", f"DNS lookup of {name}/{rdtype} failed: {exc}") from None
        except dns.exception.DNSException as exc:
            raise LookupFailed(False, 451, "4.4.3", f"DNS lookup of {name}/{rdtype} failed: {exc}") from None

    async def mx_hosts(self, domain: str) -> list[MxHost]:
        """The hosts to try for ``domain``, best first."""
        if domain.startswith("["):
            return [MxHost(domain, 0)]  # an address literal is its own host
        answer = await self._query(domain, "MX")
        if answer is None:
            return [MxHost(domain, 0)]  # implicit MX
        records = [(r.preference, r.exchange.to_text(omit_final_dot=True)) for r in answer]
        if any(name in ("", ".") for _, name in records):
            raise LookupFailed(True, 556, "5.1.10", f"domain {domain} accepts no mail (null MX)")
        by_pref: dict[int, list[str]] = {}
        for pref, name in records:
            by_pref.setdefault(pref, []).append(name.lower())
        hosts = []
        for pref in sorted(by_pref):
            names = by_pref[pref]
            self.rng.shuffle(names)
            hosts.extend(MxHost(name, pref) for name in names)
        return hosts

    async def addresses(self, host: str, families: tuple[int, ...] = (4, 6)) -> list[str]:
        """IP addresses of an MX host; empty when it has none."""
        if host.startswith("["):
            literal = host[1:-1]
            literal = literal[5:] if literal.lower().startswith("ipv6:") else literal
            return [str(ipaddress.ip_address(literal))]
        out: list[str] = []
        for family, rdtype in ((4, "A"), (6, "AAAA")):
            if family not in families:
                continue
            answer = await self._query(host, rdtype)
            if answer is not None:
                out.extend(r.to_text() for r in answer)
        return out
