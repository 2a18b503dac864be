"""Where a domain's mail goes: MX hosts in preference order, and their addresses.

Uses dnspython's async resolver against ``dns.nameservers`` (or the system's
when none are configured).  RFC 5321 §5.1: MX records sorted by preference,
equal preferences shuffled; no MX record means the domain's own A/AAAA
(implicit MX); a null MX (RFC 7505) or a domain that does not exist is a
permanent failure.  A CNAME'd MX host is followed (dnspython reads the chain
from the answer) and a truncated UDP answer is asked again over TCP
(dnspython's ``resolve``).

``MxResolver.servers`` is what one delivery attempt walks: at most
``max_hosts`` hosts, at most ``max_addresses`` addresses, IPv4 before IPv6
within a host, and every lookup of the attempt inside one deadline.  A
family whose lookup fails (an AAAA query REFUSED, SERVFAIL or timed out
while A answers is common) costs only that family's addresses, and a host
that cannot be resolved costs only that host.

Failure: ``LookupFailed`` with ``permanent`` set and a typed reply, raised
only when no address at all was found: permanent when the domain does not
exist, has a null MX, or none of its hosts has an address and every lookup
said so; transient (``451 4.4.3``, naming the domain) when a lookup failed
or the deadline passed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.nameserver
import dns.rdatatype
import dns.resolver

from mta.replies import Reply

log = logging.getLogger(__name__)

_FAMILIES = ((4, "A"), (6, "AAAA"))


class LookupFailed(Exception):
    def __init__(self, permanent: bool, code: int, enhanced: str, text: str) -> None:
        super().__init__(text)
        self.permanent = permanent
        self.reply = Reply(code, enhanced, text)


class _OutOfTime(LookupFailed):
    """The attempt's deadline cut this lookup short (not the server's own failure)."""


@dataclass(frozen=True)
class MxHost:
    name: str
    preference: int
    # The MX answer carried the AD bit (only believed with dns.dnssec): DANE may apply to this host.
    secure: bool = False


@dataclass(frozen=True)
class Server:
    """One address to try, and the MX host it belongs to."""

    host: MxHost
    address: str


def may_connect(address: str, allowed: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    """Whether direct delivery may connect to ``address``: a global one, or one ``allowed``."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback too
    return (ip.is_global and not ip.is_multicast) or any(ip in network for network in allowed)


def make_sync_resolver(nameservers: list[tuple[str, int]], timeout: float) -> dns.resolver.Resolver:
    """A blocking resolver aimed at the same servers, for libraries that resolve on their own (pyspf, dkimpy)."""
    resolver = dns.resolver.Resolver(configure=not nameservers)
    if nameservers:
        resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port) for host, port in nameservers]
    resolver.lifetime = timeout * 2
    return resolver


def make_resolver(nameservers: list[tuple[str, int]], timeout: float) -> dns.asyncresolver.Resolver:
    """A resolver aimed at the configured servers (the system's when empty)."""
    if nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port) for host, port in nameservers]
    else:
        resolver = dns.asyncresolver.Resolver()
    resolver.timeout = timeout
    resolver.lifetime = timeout * 2
    # AD in the query asks a validating resolver to say whether the answer
    # validated (RFC 6840 §5.7), without the RRSIGs that DO would bring.
    resolver.flags = dns.flags.RD | dns.flags.AD
    return resolver


def _literal(host: str) -> str:
    """``[192.0.2.1]`` or ``[IPv6:2001:db8::1]`` -> the address."""
    literal = host[1:-1]
    literal = literal[5:] if literal.lower().startswith("ipv6:") else literal
    return str(ipaddress.ip_address(literal))


class MxResolver:
    def __init__(self, resolver: dns.asyncresolver.Resolver, rng: random.Random | None = None) -> None:
        self.resolver = resolver
        self.rng = rng or random.Random()

    async def _query(self, name: str, rdtype: str, deadline: float | None = None) -> dns.resolver.Answer | None:
        """The answer, or None when the name exists without that type."""
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise _OutOfTime(False, 451, "4.4.3", f"DNS lookup of {name}/{rdtype} not started: out of time")
        # dnspython's lifetime bounds its retries; asyncio's timeout also
        # bounds its backoff sleeps, which do not look at the lifetime.
        capped = left is not None and left < self.resolver.lifetime
        lifetime = left if capped else None
        try:
            async with asyncio.timeout(left):
                return await self.resolver.resolve(name, rdtype, search=False, lifetime=lifetime)
        except dns.resolver.NXDOMAIN:
            raise LookupFailed(True, 550, "5.1.2", f"domain {name} does not exist") from None
        except dns.resolver.NoAnswer:
            return None
        except (TimeoutError, dns.exception.Timeout) as exc:
            if capped or isinstance(exc, TimeoutError):
                raise _OutOfTime(False, 451, "4.4.3", f"DNS lookup of {name}/{rdtype} timed out") from None
            raise LookupFailed(False, 451, "4.4.3", f"DNS lookup of {name}/{rdtype} failed: {exc}") from None
        except dns.exception.DNSException as exc:
            # NoNameservers (REFUSED, SERVFAIL from every server) and the rest.
            raise LookupFailed(False, 451, "4.4.3", f"DNS lookup of {name}/{rdtype} failed: {exc}") from None

    async def mx_hosts(self, domain: str, deadline: float | None = None) -> list[MxHost]:
        """The hosts to try for ``domain``, best first (``deadline``: a ``time.monotonic()`` value)."""
        if domain.startswith("["):
            return [MxHost(domain, 0)]  # an address literal is its own host
        answer = await self._query(domain, "MX", deadline)
        if answer is None:
            return [MxHost(domain, 0)]  # implicit MX
        records = [(r.preference, r.exchange.to_text(omit_final_dot=True)) for r in answer]
        secure = bool(answer.response.flags & dns.flags.AD)
        if any(name in ("", ".") for _, name in records):
            raise LookupFailed(True, 556, "5.1.10", f"domain {domain} accepts no mail (null MX)")
        by_pref: dict[int, list[str]] = {}
        for pref, name in records:
            by_pref.setdefault(pref, []).append(name.lower())
        hosts = []
        for pref in sorted(by_pref):
            names = by_pref[pref]
            self.rng.shuffle(names)
            hosts.extend(MxHost(name, pref, secure) for name in names)
        return hosts

    async def _family(self, host: str, rdtype: str, deadline: float | None) -> list[str]:
        answer = await self._query(host, rdtype, deadline)
        return [] if answer is None else [r.to_text() for r in answer]

    async def addresses(self, host: str, families: tuple[int, ...] = (4, 6),
                        deadline: float | None = None) -> list[str]:
        """IP addresses of an MX host, IPv4 first; empty when it has none.

        A family whose lookup fails is left out; ``LookupFailed`` only when
        no family gave an address and one of them failed.
        """
        if host.startswith("["):
            return [_literal(host)]
        rdtypes = [rdtype for family, rdtype in _FAMILIES if family in families]
        found = await asyncio.gather(*(self._family(host, rdtype, deadline) for rdtype in rdtypes),
                                     return_exceptions=True)
        out: list[str] = []
        failures: list[LookupFailed] = []
        for item in found:
            if isinstance(item, LookupFailed):
                failures.append(item)
            elif isinstance(item, BaseException):
                raise item
            else:
                out.extend(item)
        if out or not failures:
            return out
        raise _worst(failures)

    async def servers(self, domain: str, families: tuple[int, ...] = (4, 6), *, max_hosts: int = 10,
                      max_addresses: int = 20, timeout: float = 30.0) -> AsyncIterator[Server]:
        """The addresses to try for ``domain``, in order, as they are found.

        All the attempt's lookups start at once and share one deadline,
        ``timeout`` seconds from now, so neither the time spent connecting
        to the first hosts nor a host whose names never resolve can stretch
        the attempt; an address is handed out as soon as its lookup is
        done.  Close the iterator (``contextlib.aclosing``) to stop the
        lookups still running.  Raises ``LookupFailed`` when no address was
        found.
        """
        deadline = time.monotonic() + timeout
        try:
            hosts = (await self.mx_hosts(domain, deadline))[:max_hosts]
        except _OutOfTime:
            raise LookupFailed(False, 451, "4.4.3",
                               f"DNS lookup of the mail exchangers of {domain} did not finish within {timeout:g}s") \
                from None
        rdtypes = [rdtype for family, rdtype in _FAMILIES if family in families]
        lookups: list[list[asyncio.Task[list[str]]]] = [
            [] if host.name.startswith("[") else
            [asyncio.create_task(self._family(host.name, rdtype, deadline)) for rdtype in rdtypes]
            for host in hosts
        ]
        given = 0
        failures: list[LookupFailed] = []
        try:
            for host, tasks in zip(hosts, lookups, strict=True):
                if host.name.startswith("["):
                    given += 1
                    yield Server(host, _literal(host.name))
                    continue
                from_host = 0
                host_failures: list[LookupFailed] = []
                for task in tasks:
                    try:
                        found = await task
                    except LookupFailed as exc:
                        host_failures.append(exc)
                        continue
                    for address in found:
                        if given >= max_addresses:
                            return
                        given += 1
                        from_host += 1
                        yield Server(host, address)
                if host_failures and from_host:
                    log.info("mail exchanger %s of %s: tried the addresses that were found; %s", host.name, domain,
                             "; ".join(exc.reply.text for exc in host_failures))
                elif host_failures:
                    failures.append(_worst(host_failures))
                    log.info("mail exchanger %s of %s has no usable address: %s", host.name, domain,
                             failures[-1].reply.text)
            if given == 0:
                raise _nothing_found(domain, failures, timeout)
        finally:
            for task in (task for tasks in lookups for task in tasks):
                task.cancel()
            await asyncio.gather(*(task for tasks in lookups for task in tasks), return_exceptions=True)


def _worst(failures: Sequence[LookupFailed]) -> LookupFailed:
    """A transient failure if there is one (another try may succeed), else a permanent one."""
    return next((exc for exc in failures if not exc.permanent), failures[0])


def _nothing_found(domain: str, failures: Sequence[LookupFailed], timeout: float) -> LookupFailed:
    """Why no mail exchanger of ``domain`` gave an address (hosts without any count as permanent)."""
    if any(isinstance(exc, _OutOfTime) for exc in failures):
        return LookupFailed(False, 451, "4.4.3",
                            f"DNS lookups for the mail exchangers of {domain} did not finish within {timeout:g}s")
    transient = [exc for exc in failures if not exc.permanent]
    if transient:
        return LookupFailed(False, 451, "4.4.3",
                            f"no address found for the mail exchangers of {domain}: {transient[0].reply.text}")
    # Every mail exchanger name is dead in DNS (or the domain has no
    # address at all): waiting will not help.
    return LookupFailed(True, 550, "5.1.2", f"no address found for the mail exchangers of {domain}")
