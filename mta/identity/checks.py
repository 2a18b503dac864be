"""Deliverability self-checks: does this pod look right to receiving MTAs?

Each check is a named result, ``pass``/``warn``/``fail`` with a one-line
reason:

- ``fcrdns``: the egress address's PTR names a host whose A/AAAA includes
  the address, and that name is our HELO name;
- ``spf:<domain>``: the domain's SPF (pyspf ``check_host``) passes for the
  egress address;
- ``dkim:<selector>._domainkey.<domain>``: the published key is ours;
- ``dmarc:<domain>``: a DMARC record exists; its policy is reported;
- ``dnsbl:<zone>``: the egress address is not listed;
- ``port25``: an SMTP session with the probe host on port 25 opens from
  the egress address;
- ``egress_ip``: the address the probe saw, where it echoes it (in its
  greeting or EHLO reply, ``[203.0.113.10]``, as Gmail's and Exim's MXes do),
  is the configured egress address: an egress gateway or SNAT that sends
  from another address (another PTR, outside SPF) fails here.  A probe that
  echoes nothing gives no ``egress_ip`` result (``port25`` says so);
- ``route:<name>`` (``mta doctor`` only, ``routes``): a session with each
  route's relay as delivery opens it — DNS, TCP, TLS as the route asks
  with its certificate checks, AUTH with the route's credentials — then
  QUIT, no mail sent.  Not in the periodic checks: a provider that is down
  is the circuit breaker's business, not a reason to stop all delivery.

All DNS goes to the configured nameservers.  Failure: a check never raises;
DNS errors are ``warn`` (not known) rather than ``fail`` (known bad).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import ssl
from dataclasses import asdict, dataclass
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.resolver
import dns.reversename
import spf

from mta.config import Config, RouteConfig
from mta.delivery.client import ConnectFailed, Connector, client_settings
from mta.delivery.mx import MxResolver, make_resolver, make_sync_resolver
from mta.delivery.route import Router
from mta.dkim.keys import SigningKey, public_value
from mta.hostport import parse_host_port

PASS, WARN, FAIL = "pass", "warn", "fail"
ECHOED = re.compile(r"\[(?:IPv6:)?([0-9A-Fa-f:.]+)\]")
PROBE_REPLY_LIMIT = 8192  # octets of greeting and EHLO reply read from the probe


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class SelfChecks:
    def __init__(self, config: Config, keys: list[SigningKey],
                 resolver: dns.asyncresolver.Resolver | None = None) -> None:
        self.config = config
        self.keys = keys
        self.resolver = resolver or make_resolver(config.dns.servers, config.dns.timeout)
        egress = config.identity.egress_address or config.delivery.source_address
        self.ip = str(egress) if egress is not None else None

    def domains(self) -> list[str]:
        names = [k.domain for k in self.keys] + [d.lower() for d in self.config.identity.sending_domains]
        return list(dict.fromkeys(names))

    async def _txt(self, name: str) -> list[str] | None:
        """TXT strings at ``name``; [] when none; None when DNS did not answer."""
        try:
            answer = await self.resolver.resolve(name, "TXT", search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.DNSException:
            return None
        return [b"".join(r.strings).decode("utf-8", "replace") for r in answer]

    async def fcrdns(self) -> CheckResult:
        if self.ip is None:
            return CheckResult("fcrdns", WARN, "no egress address configured (delivery.source_address or "
                                               "identity.pods); cannot check reverse DNS")
        helo = self.config.hostname.lower().rstrip(".")
        try:
            answer = await self.resolver.resolve(dns.reversename.from_address(self.ip), "PTR", search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return CheckResult("fcrdns", FAIL, f"{self.ip} has no PTR record")
        except dns.exception.DNSException as exc:
            return CheckResult("fcrdns", WARN, f"PTR lookup of {self.ip} failed: {exc}")
        names = [r.target.to_text(omit_final_dot=True).lower() for r in answer]
        rdtype = "AAAA" if ipaddress.ip_address(self.ip).version == 6 else "A"
        for name in names:
            try:
                forward = await self.resolver.resolve(name, rdtype, search=False)
            except dns.exception.DNSException:
                continue
            if self.ip in {r.to_text() for r in forward}:
                if name != helo:
                    return CheckResult("fcrdns", FAIL, f"{self.ip} is {name}, but the HELO name is {helo}")
                return CheckResult("fcrdns", PASS, f"{self.ip} <-> {name}")
        return CheckResult("fcrdns", FAIL, f"PTR of {self.ip} is {', '.join(names)}, which does not resolve back "
                                           f"to {self.ip}")

    def _spf_sync(self, domain: str) -> tuple[str, str]:
        # pyspf looks up through dnspython's default resolver: aim it at ours.
        dns.resolver.default_resolver = make_sync_resolver(self.config.dns.servers, self.config.dns.timeout)
        return spf.check2(i=self.ip, s=f"postmaster@{domain}", h=self.config.hostname)

    async def spf(self, domain: str) -> CheckResult:
        name = f"spf:{domain}"
        if self.ip is None:
            return CheckResult(name, WARN, "no egress address configured")
        result, explanation = await asyncio.to_thread(self._spf_sync, domain)
        if result == "pass":
            return CheckResult(name, PASS, f"SPF of {domain} passes for {self.ip}")
        if result in ("temperror", "none"):
            return CheckResult(name, WARN if result == "temperror" else FAIL,
                               f"SPF of {domain} for {self.ip}: {result} ({explanation})")
        return CheckResult(name, FAIL, f"SPF of {domain} gives {result} for {self.ip} ({explanation})")

    async def dkim(self, key: SigningKey) -> CheckResult:
        record = f"{key.selector}._domainkey.{key.domain}"
        texts = await self._txt(record)
        if texts is None:
            return CheckResult(f"dkim:{record}", WARN, f"TXT lookup of {record} failed")
        ours = public_value(key.key)
        for text in texts:
            tags = dict(part.strip().split("=", 1) for part in text.split(";") if "=" in part)
            if tags.get("p", "").replace(" ", "") == ours:
                return CheckResult(f"dkim:{record}", PASS, "the published key matches the private key in use")
        if not texts:
            return CheckResult(f"dkim:{record}", FAIL, f"no DKIM key published at {record}")
        return CheckResult(f"dkim:{record}", FAIL, f"the key published at {record} is not the one in use")

    async def dmarc(self, domain: str) -> CheckResult:
        texts = await self._txt(f"_dmarc.{domain}")
        if texts is None:
            return CheckResult(f"dmarc:{domain}", WARN, f"TXT lookup of _dmarc.{domain} failed")
        records = [t for t in texts if t.replace(" ", "").lower().startswith("v=dmarc1")]
        if not records:
            return CheckResult(f"dmarc:{domain}", WARN, f"no DMARC record at _dmarc.{domain}")
        tags = dict(p.strip().split("=", 1) for p in records[0].split(";") if "=" in p)
        return CheckResult(f"dmarc:{domain}", PASS, f"DMARC policy p={tags.get('p', '?')}")

    async def dnsbl(self, zone: str) -> CheckResult:
        name = f"dnsbl:{zone}"
        if self.ip is None:
            return CheckResult(name, WARN, "no egress address configured")
        reversed_ip = dns.reversename.from_address(self.ip).to_text(omit_final_dot=True)
        query = reversed_ip.rsplit(".", 2)[0] + "." + zone.rstrip(".")
        try:
            answer = await self.resolver.resolve(query, "A", search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return CheckResult(name, PASS, f"{self.ip} is not listed")
        except dns.exception.DNSException as exc:
            return CheckResult(name, WARN, f"lookup of {query} failed: {exc}")
        codes = ", ".join(r.to_text() for r in answer)
        return CheckResult(name, FAIL, f"{self.ip} is listed on {zone} ({codes})")

    async def port25(self) -> list[CheckResult]:
        """``port25``, and ``egress_ip`` where the probe echoes the address it sees."""
        probe = self.config.identity.probe
        if not probe:
            return [CheckResult("port25", WARN, "identity.probe is not set; outbound port 25 not checked")]
        host, port = parse_host_port(probe, 25)
        bind = self.config.delivery.source_address
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, local_addr=(str(bind), 0) if bind else None), timeout=10)
        except (OSError, TimeoutError) as exc:
            return [CheckResult("port25", FAIL, f"cannot reach {host}:{port} from {self.ip or 'this pod'}: {exc}")]
        try:
            said = await asyncio.wait_for(self._greeting_and_ehlo(reader, writer), timeout=10)
        except (OSError, TimeoutError, ValueError):
            said = ""  # reachable is what port25 asks; the echo is a bonus
        finally:
            writer.close()
        reachable = CheckResult("port25", PASS, f"{host}:{port} reachable from {self.ip or 'this pod'}")
        seen = next((m for m in ECHOED.findall(said) if _is_address(m)), None)
        if seen is None:
            return [CheckResult("port25", PASS, reachable.reason + "; it does not echo the address it sees, so "
                                                "egress_ip is not checked")]
        return [reachable, self._egress_seen(host, seen)]

    async def _greeting_and_ehlo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
        said = await _reply(reader)
        writer.write(f"EHLO {self.config.hostname}\r\n".encode())
        said += await _reply(reader)
        writer.write(b"QUIT\r\n")
        return said

    def _egress_seen(self, host: str, seen: str) -> CheckResult:
        if self.ip is None:
            return CheckResult("egress_ip", WARN, f"{host} sees this pod as {seen}; no egress address is "
                                                  "configured (identity.pods, delivery.source_address) to compare")
        if ipaddress.ip_address(seen) != ipaddress.ip_address(self.ip):
            return CheckResult("egress_ip", FAIL, f"{host} sees this pod's mail come from {seen}, not from the "
                                                  f"configured egress address {self.ip}: the egress gateway or "
                                                  "SNAT sends from another address, whose PTR and SPF are not "
                                                  "checked here")
        return CheckResult("egress_ip", PASS, f"{host} sees this pod's mail come from {seen}, as configured")

    async def https(self) -> CheckResult:
        """Whether this pod reaches https (MTA-STS fetches, TLS-RPT posts): a verified TLS handshake."""
        probe = self.config.identity.https_probe
        if not probe:
            return CheckResult("https", WARN, "identity.https_probe is not set; outbound https (MTA-STS policy "
                                              "fetches, TLS-RPT reports) not checked")
        host, port = parse_host_port(probe, 443)
        ca_file = self.config.delivery.tls_ca_file
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=context, server_hostname=host), timeout=10)
        except (OSError, TimeoutError) as exc:
            # A warning, not a failure: mail still flows, but MTA-STS policies cannot be refreshed.
            return CheckResult("https", WARN, f"cannot reach https://{host}:{port} from this pod ({exc!r}): "
                                              "MTA-STS policies cannot be fetched, TLS-RPT https reports not sent")
        writer.close()
        return CheckResult("https", PASS, f"https://{host}:{port} reachable, certificate verified")

    async def routes(self) -> list[CheckResult]:
        """One result per route: can delivery open an authenticated session with its relay?"""
        connector = Connector(client_settings(self.config), MxResolver(self.resolver))
        return list(await asyncio.gather(*(self._route(connector, route) for route in self.config.routes)))

    async def _route(self, connector: Connector, route: RouteConfig) -> CheckResult:
        name = f"route:{route.label}"
        hop = Router.relay(route)
        try:
            connection = await connector.open(hop)
        except ConnectFailed as exc:
            return CheckResult(name, FAIL, f"{hop.name}: {exc.outcome.reply}")
        tls = connection.tls_info()
        await connection.close()
        said = [f"TLS {tls.version}" if tls else "no TLS (tls: none)"]
        if route.auth_file is not None:
            said.append("logged in")
        return CheckResult(name, PASS, f"{hop.name} reached: {', '.join(said)}; no mail sent")

    def configured(self) -> list[CheckResult]:
        """Warnings for what is missing from the configuration itself, before any DNS."""
        found = []
        if not self.keys:
            found.append(CheckResult("dkim", WARN, "no DKIM key configured (dkim.keys): mail leaves unsigned, "
                                                   "and receivers that require DKIM will refuse or junk it"))
        if not self.domains():
            found.append(CheckResult("domains", WARN, "no sending domain configured (identity.sending_domains or "
                                                      "dkim.keys): SPF and DMARC are not checked"))
        return found

    async def run(self) -> list[CheckResult]:
        checks = [self.fcrdns()]
        checks += [self.spf(d) for d in self.domains()]
        checks += [self.dkim(k) for k in self.keys]
        checks += [self.dmarc(d) for d in self.domains()]
        checks += [self.dnsbl(z) for z in self.config.identity.dnsbl_zones]
        if self.config.delivery.mta_sts or self.config.tls_reports.enabled:
            checks.append(self.https())
        found, probed = await asyncio.gather(asyncio.gather(*checks), self.port25())
        return self.configured() + list(found) + probed


async def _reply(reader: asyncio.StreamReader) -> str:
    """One SMTP reply, all its lines; ``ValueError`` for one that is not a reply or is too long."""
    lines: list[str] = []
    size = 0
    while True:
        line = (await reader.readline()).decode("ascii", "replace")
        size += len(line)
        if not line or size > PROBE_REPLY_LIMIT or len(line) < 4 or not line[:3].isdigit():
            raise ValueError(f"not an SMTP reply: {line[:40]!r}")
        lines.append(line)
        if line[3] != "-":
            return "".join(lines)


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def failing(results: list[CheckResult]) -> list[CheckResult]:
    return [r for r in results if r.status == FAIL]

