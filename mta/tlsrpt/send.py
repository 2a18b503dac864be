"""Sending TLS-RPT reports (RFC 8460 §3, §5): each day's report to the policy domain's ``rua`` endpoints.

``Reporter.send_day(day)`` takes every domain with sessions that day and
no report sent yet, looks up ``_smtp._tls.<domain>`` TXT (exactly one
``v=TLSRPTv1`` record; none: nothing is sent), builds the report
(``mta.tlsrpt.report``) and delivers it to each ``rua``: ``mailto:``
through kubemta's own queue (``Intake.put``, so it is stored, signed and
retried like any mail), ``https:`` as a POST of ``application/tlsrpt+gzip``
(certificate verified, no redirects, bounded in time, the host's addresses
from the configured resolver and public or in ``delivery.allowed_networks``).
``run`` does that once a day at ``tls_reports.send_at`` (UTC) for every
earlier day still unsent, so a restart only postpones a report.

Failure: nothing raises for remote trouble.  A domain whose endpoints all
failed stays unsent and is tried again at the next run; each endpoint's
outcome is in the result and logged as a ``tls_report`` event.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import logging
import ssl
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import dns.asyncresolver
import dns.exception
import dns.resolver

from mta.config import Config
from mta.delivery.mtasts import CheckedAddresses
from mta.intake import Envelope, Intake
from mta.obs.log import event
from mta.tlsrpt import report
from mta.tlsrpt.record import SessionRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportSettings:
    organization: str  # organization-name
    contact: str  # contact-info
    submitter: str  # the reporting domain (TLS-Report-Submitter), our host name
    sender: str  # From and envelope sender of mailed reports
    send_at: datetime.time = datetime.time(1, 0)  # UTC
    timeout: float = 30.0  # one HTTPS POST
    keep_days: int = 14  # days kept and caught up on


def parse_record(strings: list[str]) -> list[str] | None:
    """The ``rua`` URIs of the one ``v=TLSRPTv1`` record (RFC 8460 §3); None for none or several."""
    found = [text for text in strings if text.replace(" ", "").startswith("v=TLSRPTv1;")]
    if len(found) != 1:
        return None
    fields = dict(part.strip().partition("=")[::2] for part in found[0].split(";") if part.strip())
    uris = [uri.strip() for uri in fields.get("rua", "").split(",") if uri.strip()]
    return [uri for uri in uris if uri.lower().startswith(("mailto:", "https:"))] or None


class Reporter:
    def __init__(self, record: SessionRecord, resolver: dns.asyncresolver.Resolver, intake: Intake | None,
                 settings: ReportSettings, *, roots: ssl.SSLContext, allowed: Callable[[str], bool],
                 clock: Callable[[], float] = time.time) -> None:
        self.record = record
        self.resolver = resolver
        self.intake = intake  # None: mailto endpoints cannot be served (a CLI without a server)
        self.settings = settings
        self.roots = roots
        self.allowed = allowed
        self.clock = clock

    async def endpoints(self, domain: str) -> list[str] | None:
        try:
            answer = await self.resolver.resolve(f"_smtp._tls.{domain}", "TXT", search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        except dns.exception.DNSException as exc:
            raise LookupError(f"_smtp._tls.{domain} TXT: {exc}") from None
        return parse_record([b"".join(r.strings).decode("utf-8", "replace") for r in answer])

    def build(self, day: str, domain: str, report_id: str | None = None) -> dict[str, object]:
        settings = self.settings
        return report.build(day, domain, self.record.day(day, domain), organization=settings.organization,
                            contact=settings.contact,
                            report_id=report_id or report.new_report_id(day, domain, settings.submitter))

    async def send_day(self, day: str) -> dict[str, str]:
        """Send the unsent reports of ``day``; what happened, per domain."""
        results: dict[str, str] = {}
        for domain in self.record.domains(day):
            if self.record.sent(day, domain) is not None:
                results[domain] = "sent before"
                continue
            results[domain] = await self._send_domain(day, domain)
        return results

    async def _send_domain(self, day: str, domain: str) -> str:
        try:
            uris = await self.endpoints(domain)
        except LookupError as exc:
            event("tls_report", level=logging.WARNING, domain=domain, day=day, outcome="lookup failed",
                  detail=str(exc))
            return f"not sent: {exc}"
        if uris is None:
            self.record.mark_sent(day, domain, "", [])  # no record, no report: not asked again for this day
            return "no TLSRPT record"
        built = self.build(day, domain)
        payload = report.compress(built)
        done: list[str] = []
        outcomes = []
        for uri in uris:
            try:
                if uri.lower().startswith("mailto:"):
                    await self._mail(uri, built, payload, domain, day)
                else:
                    await self._post(uri, payload)
            except (DeliveryFailed, OSError) as exc:
                event("tls_report", level=logging.WARNING, domain=domain, day=day, rua=uri, outcome="failed",
                      detail=str(exc))
                outcomes.append(f"{uri}: {exc}")
                continue
            event("tls_report", domain=domain, day=day, rua=uri, outcome="sent", report_id=built["report-id"])
            done.append(uri)
            outcomes.append(f"{uri}: sent")
        if done:
            self.record.mark_sent(day, domain, str(built["report-id"]), done)
        return "; ".join(outcomes)

    async def _mail(self, uri: str, built: dict[str, object], payload: bytes, domain: str, day: str) -> None:
        address = urllib.parse.unquote(uri[len("mailto:"):].partition("?")[0])
        if "@" not in address:
            raise DeliveryFailed(f"{uri} names no mail address")
        if self.intake is None:
            raise DeliveryFailed("mailto endpoints are sent by the running server (mta tls report --send)")
        settings = self.settings
        data = report.message(built, payload, domain=domain, submitter=settings.submitter, sender=settings.sender,
                              recipient=address, day=day)
        stored = await self.intake.put(Envelope(settings.sender, [address], {"tls_report_for": domain}), data)
        event("queued", queue_id=stored.id, sender=settings.sender, recipients=1, size=stored.size,
              tls_report_for=domain)

    async def _post(self, uri: str, payload: bytes) -> None:
        connector = aiohttp.TCPConnector(ssl=self.roots, resolver=CheckedAddresses(self.resolver, self.allowed),
                                         use_dns_cache=False, force_close=True)
        try:
            async with aiohttp.ClientSession(connector=connector, trust_env=False,
                                             timeout=aiohttp.ClientTimeout(total=self.settings.timeout)) as session, \
                    session.post(uri, data=payload, headers={"Content-Type": report.MEDIA_TYPE},
                                 allow_redirects=False) as response:
                if not 200 <= response.status < 300:
                    raise DeliveryFailed(f"HTTP {response.status}")
        except aiohttp.ClientError as exc:
            raise DeliveryFailed(repr(exc)) from None
        except TimeoutError:
            raise DeliveryFailed(f"no answer within {self.settings.timeout:g}s") from None

    # -- the daily run ---------------------------------------------------------

    def today(self) -> datetime.date:
        return datetime.datetime.fromtimestamp(self.clock(), datetime.UTC).date()

    async def catch_up(self) -> dict[str, dict[str, str]]:
        """Every finished day still unsent, oldest first; days past ``keep_days`` are forgotten."""
        today = self.today()
        self.record.prune((today - datetime.timedelta(days=self.settings.keep_days)).isoformat())
        return {day: await self.send_day(day) for day in self.record.days() if day < today.isoformat()}

    def seconds_to_next_run(self) -> float:
        now = datetime.datetime.fromtimestamp(self.clock(), datetime.UTC)
        at = datetime.datetime.combine(now.date(), self.settings.send_at, datetime.UTC)
        if at <= now:
            at += datetime.timedelta(days=1)
        return (at - now).total_seconds()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.seconds_to_next_run())
            try:
                await self.catch_up()
            except Exception:  # a report must never take the server down; tomorrow tries again
                log.exception("TLS-RPT reports failed")


class DeliveryFailed(Exception):
    pass


def record_path(spool_root: Path) -> Path:
    return spool_root / "tls" / "tlsrpt.db"


def build(config: Config, record: SessionRecord, intake: Intake | None) -> Reporter:
    """The reporter ``mta serve`` runs and ``mta tls report`` uses, from ``tls_reports``."""
    from mta.delivery.mx import make_resolver, may_connect
    settings = config.tls_reports
    hour, minute = (int(part) for part in settings.send_at.split(":"))
    roots = ssl.create_default_context(
        cafile=str(config.delivery.tls_ca_file) if config.delivery.tls_ca_file else None)
    roots.minimum_version = ssl.TLSVersion.TLSv1_2
    return Reporter(record, make_resolver(config.dns.servers, config.dns.timeout), intake, ReportSettings(
        organization=settings.organization_name or config.hostname,
        contact=settings.contact_info or f"postmaster@{config.hostname}",
        submitter=config.hostname, sender=settings.sender or f"tls-reports@{config.hostname}",
        send_at=datetime.time(hour, minute), timeout=settings.timeout, keep_days=settings.keep_days),
        roots=roots, allowed=functools.partial(may_connect, allowed=tuple(config.delivery.allowed_networks)))
