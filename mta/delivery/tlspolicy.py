"""Outbound TLS policy for direct delivery: what each MX session must prove.

Owns the decision, per recipient domain and MX host, between the levels
(strongest first; Postfix's ``smtp_tls_security_level`` in spirit):

- **dane**: DNSSEC-validated TLSA records for the MX host (``mta.delivery.dane``)
  and a session that matches them.  Applies whenever such records exist
  and ``delivery.dane`` is on; the level ``dane`` in ``tls_policy`` makes
  them required.  DANE wins over MTA-STS (RFC 8461 §2).
- **mta-sts**: the domain publishes an MTA-STS policy (``mta.delivery.mtasts``).
  ``enforce``: only MX hosts the policy names, each with a certificate for
  its name from the roots.  ``testing``: the same is tried, failures are
  reported, delivery goes on.
- **verify**: a certificate for the MX host name from the roots.
- **encrypt**: TLS required, certificate not checked.
- **may**: TLS when offered, plain text otherwise (RFC 7435) — unless the
  domain's MX offered STARTTLS before (``mta.delivery.seen``) and no
  ``tls_policy`` rule names the domain: then TLS is required, so stripping
  STARTTLS defers the mail instead of letting it be read.
- **none**: no TLS.

The level of a domain comes from the first ``tls_policy`` rule that
matches it (exact names before ``*.parent``), else ``delivery.tls_level``.
Smart-host routes keep their own ``tls``/``tls_verify`` and never come here.

Failure: ``host`` returns an ``Outcome`` (transient, ``4.7.5``) when a
host may not be used under the policy; nothing here raises for remote
trouble.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
from dataclasses import dataclass, replace

import dns.asyncresolver

from mta.config import Config, TlsPolicyRule
from mta.delivery import dane, result
from mta.delivery.dane import Tlsa
from mta.delivery.mtasts import MtaSts, StsPolicy
from mta.delivery.mx import MxHost, may_connect
from mta.delivery.result import Outcome, PolicyVerdict
from mta.delivery.seen import StartTlsSeen
from mta.domains import DomainMap
from mta.tlsrpt.record import ReportPolicy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HostTls:
    """What one session with an MX host must do."""

    policy: str  # dane | mta-sts | verify | encrypt | may | none
    starttls: bool = True  # try STARTTLS at all
    required: bool = False  # no STARTTLS or a failed check: defer, never plain text
    verify_roots: bool = False  # a certificate for the MX name from the roots
    tlsa: tuple[Tlsa, ...] = ()  # dane: the session must match one of these (none usable: TLS only)
    mode: str | None = None  # MTA-STS mode
    testing: bool = False  # MTA-STS testing: failures are reported, delivery goes on
    why: str = ""  # for messages: what made TLS required
    noted: str | None = None  # a failure already found and reported (MTA-STS testing)

    def verdict(self, outcome: str = "ok") -> PolicyVerdict:
        return PolicyVerdict(self.policy, self.mode, self.noted if outcome == "ok" and self.noted else outcome)

    def relaxed(self, noted: str) -> HostTls:
        """After a failure reported under MTA-STS testing: TLS when offered, unchecked."""
        return replace(self, verify_roots=False, testing=False, noted=noted)


@dataclass(frozen=True)
class DomainTls:
    """The policy of one recipient domain, before any MX host is looked at."""

    domain: str
    level: str
    source: str  # which setting gave the level
    seen: bool = False  # its MX offered STARTTLS before
    sts: StsPolicy | None = None
    sts_problem: str | None = None  # RFC 8460 result type of a failed MTA-STS lookup
    sts_detail: str | None = None

    @property
    def enforced_sts(self) -> StsPolicy | None:
        return self.sts if self.sts is not None and self.sts.mode == "enforce" else None


def _skip(verdict: PolicyVerdict, text: str) -> Outcome:
    return Outcome(result.Kind.TRANSIENT, result.Reply(454, "4.7.5", text), policy=verdict)


class TlsPolicy:
    def __init__(self, rules: list[TlsPolicyRule], default: str = "may", *, seen: StartTlsSeen | None = None,
                 sts: MtaSts | None = None, dane_resolver: dns.asyncresolver.Resolver | None = None,
                 port: int = 25, sts_timeout: float = 15.0) -> None:
        self.rules: DomainMap[TlsPolicyRule] = DomainMap(
            (pattern, rule) for rule in rules for pattern in rule.match)
        self.default = default
        self.seen = seen
        self.sts = sts
        self.dane_resolver = dane_resolver  # None: DANE off (no validating resolver)
        self.port = port
        self.sts_timeout = sts_timeout

    def level(self, domain: str) -> tuple[str, str]:
        rule = self.rules.lookup(domain)
        if rule is not None:
            return rule.level, f"tls_policy rule {', '.join(rule.match)}"
        return self.default, "delivery.tls_level"

    async def domain(self, domain: str) -> DomainTls:
        level, source = self.level(domain)
        if domain.startswith("[") or level == "none":
            return DomainTls(domain, level, source)  # an address literal names no policy
        # An explicit rule is the operator's word for the domain: the memory only raises the default.
        seen = source == "delivery.tls_level" and self.seen is not None and self.seen.required(domain)
        if self.sts is None:
            return DomainTls(domain, level, source, seen)
        try:
            async with asyncio.timeout(self.sts_timeout):
                found = await self.sts.lookup(domain)
        except TimeoutError:
            cached = self.sts.cached(domain)
            return DomainTls(domain, level, source, seen, cached, "sts-policy-fetch-error",
                             f"MTA-STS lookup did not finish within {self.sts_timeout:g}s")
        policy = found.policy if found.policy is not None and found.policy.mode != "none" else None
        return DomainTls(domain, level, source, seen, policy, found.problem, found.detail)

    async def host(self, domain: DomainTls, host: MxHost) -> HostTls | Outcome:
        """How to talk to ``host`` for ``domain``, or why it may not be used."""
        if domain.level == "none":
            return HostTls("none", starttls=False)
        if domain.domain.startswith("["):
            return HostTls("may")
        if self.dane_resolver is not None and host.secure:
            answer = await dane.lookup(self.dane_resolver, host.name, self.port)
            if answer.failed is not None:
                return _skip(PolicyVerdict("dane", None, "dnssec-invalid"),
                             f"{answer.failed}; {host.name} is not used until it answers")
            if answer.records:
                return HostTls("dane", required=True, tlsa=answer.usable, why="DANE TLSA records")
        if domain.level == "dane":
            return _skip(PolicyVerdict("dane", None, "dane-required"),
                         f"no DNSSEC-validated TLSA records for {host.name}, which {domain.source} requires "
                         "(level dane)")
        sts = domain.sts
        base = self._by_level(domain)
        if sts is None:
            return base
        matched = sts.matches(host.name)
        text = f"{host.name} is not a mail exchanger in the MTA-STS policy of {domain.domain}"
        if sts.mode == "enforce":
            if not matched:
                return _skip(PolicyVerdict("mta-sts", "enforce", "validation-failure"), text)
            return HostTls("mta-sts", required=True, verify_roots=True, mode="enforce",
                           why=f"the MTA-STS policy of {domain.domain}")
        # testing: what enforce would check is checked and reported; what the level requires still holds.
        if not matched:
            log.warning("%s (mode testing: delivering anyway)", text)
            return replace(base, policy="mta-sts", mode="testing", noted="validation-failure")
        return replace(base, policy="mta-sts", mode="testing", verify_roots=True, testing=not base.verify_roots)

    @staticmethod
    def _by_level(domain: DomainTls) -> HostTls:
        if domain.level == "verify":
            return HostTls("verify", required=True, verify_roots=True, why=domain.source)
        if domain.level == "encrypt":
            return HostTls("encrypt", required=True, why=domain.source)
        if domain.seen:
            return HostTls("may", required=True,
                           why=f"{domain.domain} offered STARTTLS before (delivery.remember_starttls)")
        return HostTls("may")

    @staticmethod
    def report_policy(domain: DomainTls, plan: HostTls | None, verdict: PolicyVerdict) -> ReportPolicy | None:
        """The policy a session counts under in TLS-RPT (RFC 8460 §4.4); None: not a session to report."""
        if domain.level == "none" or domain.domain.startswith("["):
            return None
        if verdict.policy == "dane":
            records = plan.tlsa if plan is not None else ()
            if verdict.result == "dane-required":
                return ReportPolicy("no-policy-found")
            return ReportPolicy("tlsa", tuple(f"{r.usage} {r.selector} {r.mtype} {r.data.hex()}" for r in records))
        sts = domain.sts
        if verdict.policy == "mta-sts" and sts is not None:
            lines = ("version: STSv1", f"mode: {sts.mode}", *(f"mx: {item}" for item in sts.mx),
                     f"max_age: {sts.max_age}")
            return ReportPolicy("sts", lines, sts.mx)
        if domain.sts_problem is not None:
            return ReportPolicy("sts")  # the policy could not be had: the failure is the fetch's
        return ReportPolicy("no-policy-found")

    def succeeded(self, domain: str) -> None:
        """A TLS session with an MX host of ``domain`` came up."""
        if self.seen is not None and not domain.startswith("["):
            self.seen.record(domain)

    def close(self) -> None:
        if self.seen is not None:
            self.seen.flush()


def build(config: Config, resolver: dns.asyncresolver.Resolver) -> TlsPolicy:
    """The policy ``mta serve`` and ``mta tls check`` use: its memory and cache on the spool volume."""
    delivery = config.delivery
    root = config.spool.path / "tls"
    seen = StartTlsSeen(root / "starttls-seen.json", delivery.remember_starttls) \
        if delivery.remember_starttls > 0 else None
    sts = None
    if delivery.mta_sts:
        roots = ssl.create_default_context(cafile=str(delivery.tls_ca_file) if delivery.tls_ca_file else None)
        roots.minimum_version = ssl.TLSVersion.TLSv1_2
        sts = MtaSts(resolver, root / "mta-sts", roots, port=delivery.mta_sts_port,
                     allowed=functools.partial(may_connect, allowed=tuple(delivery.allowed_networks)))
    # DANE only with a resolver whose AD bit may be believed (dns.dnssec; see mta.delivery.dane).
    dane_resolver = resolver if config.dns.dnssec and delivery.dane else None
    return TlsPolicy(config.tls_policy, delivery.tls_level, seen=seen, sts=sts, dane_resolver=dane_resolver,
                     port=delivery.port)
