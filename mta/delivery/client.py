"""Opening outbound SMTP connections (aiosmtplib) to a next hop.

``Connector.open`` finds a server for a next hop — MX hosts in order, each
of their addresses, skipping hosts that do not answer or resolve, within the
per-attempt bounds of ``ClientSettings`` (``mta.delivery.mx``) — binds the configured
source address, says EHLO with our host name and upgrades to TLS: for
smart hosts as their route says (verified against the route's roots), for
MX hosts as the outbound TLS policy says (``mta.delivery.tlspolicy``: DANE,
MTA-STS, the configured level, STARTTLS seen before), which may also rule
out MX hosts.  Without a policy, MX hosts get opportunistic, unverified
STARTTLS, in plain text again if the handshake fails (RFC 7435).  The
session itself is ``mta.delivery.connection.Connection``; the courier
(``mta.delivery.courier``) decides which connection a message uses.

Failure: ``ConnectFailed`` carrying the outcome for every recipient of the
hop (a policy that rules out every MX host: ``454 4.7.x``).
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib

from mta import replies
from mta.config import Config, RouteConfig
from mta.delivery import result
from mta.delivery.connection import Connection, StaleConnection, reply_text
from mta.delivery.mx import LookupFailed, MxHost, MxResolver, may_connect
from mta.delivery.result import Kind, Outcome, PolicyVerdict
from mta.delivery.route import NextHop
from mta.delivery.starttls import PolicyFailed, Reconnect, upgrade
from mta.delivery.tlspolicy import DomainTls, HostTls, TlsPolicy
from mta.tlsrpt.record import SessionRecord

__all__ = ["ClientSettings", "ConnectFailed", "Connection", "Connector", "StaleConnection", "may_connect"]

log = logging.getLogger(__name__)


class ConnectFailed(Exception):
    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.reply)
        self.outcome = outcome


@dataclass(frozen=True)
class ClientSettings:
    helo_name: str
    port: int = 25
    source_address: str | None = None
    # The address receivers see (identity.egress_address): behind an egress
    # gateway's SNAT it is not the socket's local address, and TLS-RPT's
    # sending-mta-ip must name what the receiver saw.
    egress_address: str | None = None
    connect_timeout: float = 30.0
    command_timeout: float = 120.0
    # Per attempt, so a domain with hundreds of MX records or names that
    # never resolve cannot hold a delivery slot for minutes.
    max_mx_hosts: int = 10  # MX hosts looked up, best first
    max_mx_addresses: int = 20  # addresses tried
    dns_attempt_timeout: float = 30.0  # all the DNS lookups of one attempt together
    # Direct delivery connects only to global addresses and these: an MX that
    # points at loopback, a private range or a metadata address (169.254.169.254)
    # must not make the MTA a way into the cluster.  Smart hosts are exempt.
    allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


def client_settings(config: Config) -> ClientSettings:
    """The delivery client's settings, from ``delivery`` and ``identity``."""
    delivery = config.delivery
    return ClientSettings(
        helo_name=config.hostname,
        port=delivery.port,
        source_address=str(delivery.source_address) if delivery.source_address else None,
        egress_address=str(config.identity.egress_address) if config.identity.egress_address else None,
        connect_timeout=delivery.connect_timeout,
        command_timeout=delivery.command_timeout,
        max_mx_hosts=delivery.max_mx_hosts,
        max_mx_addresses=delivery.max_mx_addresses,
        dns_attempt_timeout=config.dns.attempt_timeout,
        allowed_networks=tuple(delivery.allowed_networks),
    )


def read_credentials(path: Path, key_only_user: str | None = None, key_only: bool = False) -> tuple[str, str]:
    """``user:password`` on the first line (a Secret mounted as a file).

    With ``key_only`` (a provider's route, or one naming ``auth_user``) the
    line may hold the key alone: the user name is then ``key_only_user``,
    or the key itself where that is None (Postmark's server token).
    """
    lines = path.read_text().splitlines()
    line = lines[0] if lines else ""
    user, sep, password = line.partition(":")
    if not sep and key_only and line:
        return (line if key_only_user is None else key_only_user), line
    if not sep or not user:
        expected = "'username:password' or the API key" if key_only else "'username:password'"
        raise ValueError(f"{path}: expected {expected} on the first line")
    return user, password


def route_credentials(route: RouteConfig) -> tuple[str, str]:
    """The login of a route with ``auth_file``, after its provider's user-name convention."""
    assert route.auth_file is not None
    return read_credentials(route.auth_file, route.auth_user,
                            key_only=route.provider is not None or route.auth_user is not None)


@functools.lru_cache(maxsize=32)
def _tls_context(verify: bool, ca_file: Path | None) -> ssl.SSLContext:
    """One context per (verify, roots): loading the CA bundle costs milliseconds."""
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class Connector:
    """Opens connections to next hops; the network pieces are injectable."""

    def __init__(self, settings: ClientSettings, mx: MxResolver, policy: TlsPolicy | None = None,
                 roots: Path | None = None, reports: SessionRecord | None = None) -> None:
        self.settings = settings
        self.mx = mx
        # No policy given: TLS when offered, unverified (level may with nothing remembered).
        self.policy = policy or TlsPolicy([], "may")
        self.roots = roots  # the CA bundle for verify and MTA-STS; None: the system's
        self.reports = reports  # TLS-RPT: every direct session's TLS outcome is counted here

    def _families(self) -> tuple[int, ...]:
        source = self.settings.source_address
        if source is None:
            return (4, 6)
        return (6,) if ":" in source else (4,)

    async def open(self, hop: NextHop) -> Connection:
        if hop.kind == "relay":
            return await self._open_relay(hop)
        return await self._open_mx(hop.name)

    async def _open_mx(self, domain: str) -> Connection:
        """The first of the domain's servers that takes a session under the TLS policy; a host or
        a family whose lookup fails is skipped, only no address at all fails the lookup."""
        settings = self.settings
        last: Outcome | None = None
        refused = connectable = 0
        domain_tls = await self.policy.domain(domain)
        plans: dict[str, HostTls | Outcome] = {}
        servers = self.mx.servers(domain, self._families(), max_hosts=settings.max_mx_hosts,
                                  max_addresses=settings.max_mx_addresses, timeout=settings.dns_attempt_timeout)
        try:
            async with contextlib.aclosing(servers):
                async for server in servers:
                    name = server.host.name
                    mx_host = None if name.startswith("[") else name
                    if not may_connect(server.address, settings.allowed_networks):
                        refused += 1
                        log.warning("delivery to %s: %s[%s] is not a public address and not in "
                                    "delivery.allowed_networks; not connecting", domain, name, server.address)
                        continue
                    connectable += 1
                    plan = plans.get(name) or await self._plan(domain_tls, server.host)
                    plans[name] = plan
                    if isinstance(plan, Outcome):
                        if plan.policy is not None:
                            self._count(domain_tls, None, plan.policy, name, server.address, None)
                        last = plan
                        log.info("delivery to %s: %s not used: %s", domain, name, plan.reply)
                        continue
                    try:
                        connection = await self._direct(domain_tls, server.address, mx_host, name, plan)
                    except ConnectFailed as exc:
                        last = exc.outcome
                        log.info("delivery to %s: %s", exc.outcome.remote, exc.outcome.reply)
                        continue
                    if connection.tls:
                        self.policy.succeeded(domain)
                    return connection
        except LookupFailed as exc:
            raise ConnectFailed(Outcome(Kind.PERMANENT if exc.permanent else Kind.TRANSIENT, exc.reply)) from None
        if refused and not connectable:
            raise ConnectFailed(result.permanent(
                554, "5.4.4", f"the mail exchangers of {domain} have only addresses that direct delivery may not "
                f"use (loopback, private or link-local; see delivery.allowed_networks)"))
        raise ConnectFailed(last or result.transient(451, "4.4.1", f"no mail exchanger of {domain} answered"))

    async def _plan(self, domain_tls: DomainTls, host: MxHost) -> HostTls | Outcome:
        plan = await self.policy.host(domain_tls, host)
        if isinstance(plan, Outcome):  # name the host the policy ruled out, as a server's failure would
            return Outcome(plan.kind, plan.reply, host.name, None, policy=plan.policy)
        return plan

    def _count(self, domain_tls: DomainTls, plan: HostTls | None, verdict: PolicyVerdict, name: str,
                address: str, local: str | None) -> None:
        """The TLS-RPT hook: one session (or one MX host the policy ruled out) and how its TLS went."""
        if self.reports is None:
            return
        policy = self.policy.report_policy(domain_tls, plan, verdict)
        if policy is None:
            return
        outcome = verdict.result
        if policy.type == "sts" and not policy.strings and domain_tls.sts_problem is not None:
            outcome = domain_tls.sts_problem
        sending_ip = self.settings.egress_address or local or self.settings.source_address
        self.reports.session(domain_tls.domain, policy, outcome, sending_ip=sending_ip, mx_host=name, mx_ip=address)

    async def _direct(self, domain_tls: DomainTls, address: str, mx_host: str | None, name: str,
                      plan: HostTls) -> Connection:
        """A session with one MX address, TLS as ``plan`` says."""
        smtp = await self._session(address, self.settings.port, mx_host, address, tls="none")
        remote = result.remote_name(mx_host, address) or address
        sockname = smtp.get_transport_info("sockname")
        local = str(sockname[0]) if sockname else None
        try:
            verdict = await upgrade(smtp, plan, name, remote, roots=_tls_context(True, self.roots),
                                    unverified=_tls_context(False, None))
        except PolicyFailed as exc:
            self._count(domain_tls, plan, exc.verdict, name, address, local)
            raise ConnectFailed(Outcome(Kind.TRANSIENT, exc.reply, mx_host, address, policy=exc.verdict)) from None
        except Reconnect as exc:
            # Ends: a relaxed plan no longer verifies, a plain-text one tries no STARTTLS.
            # The session that goes on reports the failure (its verdict carries it): counted once.
            return await self._direct(domain_tls, address, mx_host, name, exc.host_tls)
        except (aiosmtplib.SMTPException, OSError) as exc:
            smtp.close()
            raise ConnectFailed(Outcome(Kind.TRANSIENT, replies.Reply(451, "4.4.2", f"session with {remote} lost "
                                        f"after STARTTLS: {exc}"), mx_host, address, policy=plan.verdict())) \
                from None
        self._count(domain_tls, plan, verdict, name, address, local)
        return Connection(smtp, mx_host, address, verdict)

    async def _open_relay(self, hop: NextHop) -> Connection:
        route = hop.route
        assert route is not None
        host, port = route.relay_host_port
        connection = await self._connect_relay(host, port, hop.name, tls=route.tls, verify=route.tls_verify,
                                               ca_file=route.ca_file)
        if route.auth_file is not None:
            if not connection.tls and route.tls != "none":
                await connection.close()
                raise ConnectFailed(result.transient(
                    454, "4.7.0", f"smart host {hop.name} offered no TLS; credentials not sent"))
            try:
                user, password = route_credentials(route)
            except (OSError, ValueError) as exc:
                await connection.close()
                raise ConnectFailed(result.transient(451, "4.3.5", f"smart host credentials unusable: {exc}")) \
                    from None
            try:
                await connection.smtp.login(user, password)
            except aiosmtplib.SMTPException as exc:
                await connection.close()
                detail = reply_text(exc) if isinstance(exc, aiosmtplib.SMTPResponseException) else str(exc)
                raise ConnectFailed(connection.outcome(
                    Kind.TRANSIENT, 454, "4.7.0", f"authentication to smart host {hop.name} failed: {detail}")) \
                    from None
        return connection

    async def _session(self, address: str, port: int, mx_host: str | None, mx_ip: str | None, *, tls: str,
                       verify: bool = False, ca_file: Path | None = None) -> aiosmtplib.SMTP:
        """Connected and greeted (EHLO); implicit TLS when ``tls`` says so."""
        settings = self.settings
        remote = result.remote_name(mx_host, mx_ip)
        context = _tls_context(verify, ca_file)
        smtp = aiosmtplib.SMTP(
            hostname=address,
            port=port,
            local_hostname=settings.helo_name,
            source_address=(settings.source_address, 0) if settings.source_address else None,
            timeout=settings.command_timeout,
            use_tls=tls == "implicit",
            start_tls=False,
            tls_context=context if tls == "implicit" else None,
            validate_certs=verify,
        )
        try:
            # Implicit TLS (relays only) checks the certificate against ``address``, the relay's name.
            await smtp.connect(timeout=settings.connect_timeout)
            await smtp.ehlo()
        except aiosmtplib.SMTPResponseException as exc:
            smtp.close()
            raise _failed(mx_host, mx_ip, 451, "4.4.0", f"{remote} refused the session: {reply_text(exc)}") \
                from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            smtp.close()
            raise _failed(mx_host, mx_ip, 451, "4.4.1", f"cannot connect to {remote}: {exc}") from None
        return smtp

    async def _connect_relay(self, host: str, port: int, name: str, *, tls: str, verify: bool,
                             ca_file: Path | None) -> Connection:
        """A smart host's session: its route's ``tls`` and ``tls_verify`` decide, no TLS policy."""
        smtp = await self._session(host, port, name, None, tls=tls, verify=verify, ca_file=ca_file)
        if tls in ("starttls", "opportunistic"):
            if smtp.supports_extension("starttls"):
                try:
                    await smtp.starttls(server_hostname=host, tls_context=_tls_context(verify, ca_file),
                                        validate_certs=verify)
                    # STARTTLS discards what the server said before (RFC 3207 §4.2): ask
                    # again, or MAIL would go out without SIZE, BODY and SMTPUTF8.
                    await smtp.ehlo()
                except (aiosmtplib.SMTPException, ssl.SSLError, OSError) as exc:
                    smtp.close()
                    if tls == "opportunistic":
                        log.warning("STARTTLS with %s failed (%s); retrying in plain text", name, exc)
                        return await self._connect_relay(host, port, name, tls="none", verify=False, ca_file=None)
                    raise _failed(name, None, 454, "4.7.5", f"TLS with {name} failed: {exc}") from None
            elif tls == "starttls":
                await Connection(smtp, name, None).close()
                raise _failed(name, None, 454, "4.7.4", f"{name} does not offer STARTTLS")
        return Connection(smtp, name, None)


def _failed(mx_host: str | None, mx_ip: str | None, code: int, enhanced: str, text: str) -> ConnectFailed:
    return ConnectFailed(Outcome(Kind.TRANSIENT, replies.Reply(code, enhanced, text), mx_host, mx_ip))
