"""MTA-STS (RFC 8461): a recipient domain's published TLS policy, fetched, checked and cached.

``MtaSts.lookup(domain)`` reads the ``_mta-sts.<domain>`` TXT record (the
policy's id), fetches ``https://mta-sts.<domain>/.well-known/mta-sts.txt``
when there is no cached policy with that id, and parses it.  The fetch
verifies the server's certificate against the configured roots, follows
no redirect, reads at most ``max_size`` octets and gives up after
``timeout`` seconds; the host's addresses come from the configured
resolver and must be public or in ``delivery.allowed_networks``, as for
MX hosts.  A good policy is cached in ``<spool.path>/tls/mta-sts/`` until
its ``max_age`` ends, so it survives a restart while the policy server is
down, as §5.1 expects; a TXT record that disappears does not remove a
cached policy, a new id makes it fetched again.

Failure: ``lookup`` never raises.  It returns the policy that applies (the
cached one when a refresh fails) or None, and, when something went wrong,
the problem in RFC 8460's words (``sts-policy-fetch-error``,
``sts-policy-invalid``, ``sts-webpki-invalid``) with a detail for the log.
A cache file that cannot be read is ignored.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp
import aiohttp.abc
import dns.asyncresolver
import dns.exception
import dns.resolver

from spool import safeio

log = logging.getLogger(__name__)

MAX_AGE_LIMIT = 31_557_600  # RFC 8461 §3.2: at most a year
_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")
_MX_PATTERN = re.compile(r"^(\*\.)?([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)+$")
_TXT_RECHECK = 60.0  # seconds a TXT answer is trusted in memory, so a busy domain costs no lookup per message
_MEMORY = 10_000  # domains whose policy and TXT answer are kept in memory


def _keep(table: dict[str, object], key: str, value: object) -> None:
    table.pop(key, None)
    table[key] = value
    while len(table) > _MEMORY:
        del table[next(iter(table))]


class PolicyInvalid(ValueError):
    pass


@dataclass(frozen=True)
class StsPolicy:
    mode: str  # enforce | testing | none
    mx: tuple[str, ...]
    max_age: int
    id: str  # from the TXT record the policy was fetched under
    fetched: float  # time.time() of the fetch

    @property
    def expires(self) -> float:
        return self.fetched + self.max_age

    def matches(self, host: str) -> bool:
        """RFC 8461 §4.1: exact names, or ``*.`` standing for exactly one leftmost label."""
        host = host.lower().rstrip(".")
        for pattern in self.mx:
            if pattern.startswith("*."):
                label, _, rest = host.partition(".")
                if label and rest == pattern[2:]:
                    return True
            elif host == pattern:
                return True
        return False


@dataclass(frozen=True)
class StsLookup:
    policy: StsPolicy | None
    problem: str | None = None  # RFC 8460 result type, when something failed
    detail: str | None = None


def parse_txt(strings: Sequence[str]) -> str | None:
    """The id of the one ``v=STSv1`` record among a name's TXT records; None for none or several."""
    found = [text for text in strings if text.startswith("v=STSv1")]
    if len(found) != 1:
        return None
    fields = dict(part.strip().partition("=")[::2] for part in found[0].split(";") if part.strip())
    ident = fields.get("id", "")
    return ident if _ID.match(ident) else None


def parse_policy(text: str, ident: str, fetched: float) -> StsPolicy:
    fields: dict[str, str] = {}
    mx: list[str] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise PolicyInvalid(f"not a 'key: value' line: {line[:60]!r}")
        key, value = key.strip(), value.strip()
        if key == "mx":
            pattern = value.lower().rstrip(".")
            if not _MX_PATTERN.match(pattern):
                raise PolicyInvalid(f"mx {value!r} is not a host name or '*.' pattern")
            mx.append(pattern)
        else:
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1":
        raise PolicyInvalid(f"version {fields.get('version')!r}, not STSv1")
    mode = fields.get("mode")
    if mode not in ("enforce", "testing", "none"):
        raise PolicyInvalid(f"mode {mode!r} is not enforce, testing or none")
    age = fields.get("max_age", "")
    if not age.isdigit() or len(age) > 10 or int(age) > MAX_AGE_LIMIT:
        raise PolicyInvalid(f"max_age {age!r} is not a number of seconds up to {MAX_AGE_LIMIT}")
    if mode != "none" and not mx:
        raise PolicyInvalid(f"mode {mode} without any mx")
    return StsPolicy(mode, tuple(mx), int(age), ident, fetched)


class CheckedAddresses(aiohttp.abc.AbstractResolver):
    """aiohttp's name lookups through the configured resolver, public addresses only."""

    def __init__(self, resolver: dns.asyncresolver.Resolver, allowed: Callable[[str], bool]) -> None:
        self.resolver = resolver
        self.allowed = allowed

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[aiohttp.abc.ResolveResult]:
        out: list[aiohttp.abc.ResolveResult] = []
        for rdtype, fam in (("A", socket.AF_INET), ("AAAA", socket.AF_INET6)):
            if family not in (fam, socket.AF_UNSPEC):
                continue
            try:
                answer = await self.resolver.resolve(host, rdtype, search=False)
            except dns.exception.DNSException:
                continue
            out.extend({"hostname": host, "host": r.to_text(), "port": port, "family": fam, "proto": 0,
                        "flags": socket.AI_NUMERICHOST} for r in answer if self.allowed(r.to_text()))
        if not out:
            raise OSError(f"no usable address for {host}")
        return out

    async def close(self) -> None:
        pass


class MtaSts:
    def __init__(self, resolver: dns.asyncresolver.Resolver, cache_dir: Path, ssl_context: ssl.SSLContext, *,
                 allowed: Callable[[str], bool], port: int = 443, timeout: float = 10.0, max_size: int = 65536,
                 clock: Callable[[], float] = time.time) -> None:
        self.resolver = resolver
        self.cache_dir = cache_dir
        self.ssl_context = ssl_context
        self.allowed = allowed
        self.port = port
        self.timeout = timeout
        self.max_size = max_size
        self.clock = clock
        # Both bounded (``_MEMORY`` domains, oldest out): the disk cache holds the rest.
        self._memory: dict[str, StsPolicy] = {}
        self._txt: dict[str, tuple[float, str | None]] = {}  # domain -> (monotonic time, id)
        self._inflight: dict[str, asyncio.Task[StsLookup]] = {}

    # -- cache ---------------------------------------------------------------

    def _path(self, domain: str) -> Path:
        return self.cache_dir / f"{domain}.json"

    def cached(self, domain: str) -> StsPolicy | None:
        """The cached policy, even an expired one; None when there is none."""
        if domain in self._memory:
            return self._memory[domain]
        try:
            tree = json.loads(self._path(domain).read_text())
            policy = StsPolicy(str(tree["mode"]), tuple(str(item) for item in tree["mx"]), int(tree["max_age"]),
                               str(tree["id"]), float(tree["fetched"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.warning("MTA-STS cache %s unreadable (%s); ignored", self._path(domain), exc)
            return None
        _keep(self._memory, domain, policy)  # type: ignore[arg-type]
        return policy

    def _store(self, domain: str, policy: StsPolicy) -> None:
        _keep(self._memory, domain, policy)  # type: ignore[arg-type]
        try:
            self.cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            safeio.write_file(self._path(domain), json.dumps(asdict(policy)).encode(), 0o600)
        except OSError as exc:
            log.warning("cannot cache the MTA-STS policy of %s: %s", domain, exc)

    # -- lookups ---------------------------------------------------------------

    async def _txt_id(self, domain: str) -> tuple[bool, str | None]:
        """(answered, id): answered False when the lookup failed."""
        remembered = self._txt.get(domain)
        if remembered is not None and time.monotonic() - remembered[0] < _TXT_RECHECK:
            return True, remembered[1]
        try:
            answer = await self.resolver.resolve(f"_mta-sts.{domain}", "TXT", search=False)
            strings = [b"".join(r.strings).decode("utf-8", "replace") for r in answer]
            ident = parse_txt(strings)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            ident = None
        except dns.exception.DNSException as exc:
            log.info("MTA-STS TXT lookup for %s failed: %s", domain, exc)
            return False, None
        _keep(self._txt, domain, (time.monotonic(), ident))  # type: ignore[arg-type]
        return True, ident

    async def fetch(self, domain: str, ident: str) -> StsPolicy:
        """Fetch and parse the policy; raises ``PolicyInvalid`` or ``FetchFailed``."""
        host = f"mta-sts.{domain}"
        netloc = host if self.port == 443 else f"{host}:{self.port}"
        url = f"https://{netloc}/.well-known/mta-sts.txt"
        connector = aiohttp.TCPConnector(ssl=self.ssl_context, resolver=CheckedAddresses(self.resolver, self.allowed),
                                         use_dns_cache=False, force_close=True)
        try:
            async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout),
                                             trust_env=False) as session, \
                    session.get(url, allow_redirects=False) as response:
                if response.status != 200:
                    raise FetchFailed("sts-policy-fetch-error", f"{url}: HTTP {response.status} (redirects are "
                                      "not followed)" if 300 <= response.status < 400 else f"{url}: HTTP "
                                      f"{response.status}")
                if response.content_type != "text/plain":
                    raise PolicyInvalid(f"{url}: media type {response.content_type}, not text/plain")
                body = b""
                async for chunk in response.content.iter_chunked(8192):
                    body += chunk
                    if len(body) > self.max_size:
                        raise PolicyInvalid(f"{url}: larger than {self.max_size} octets")
        except aiohttp.ClientConnectorCertificateError as exc:
            raise FetchFailed("sts-webpki-invalid", f"{url}: {exc.certificate_error}") from None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise FetchFailed("sts-policy-fetch-error", f"{url}: {exc!r}") from None
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise PolicyInvalid(f"{url}: not UTF-8") from None
        return parse_policy(text, ident, self.clock())

    async def lookup(self, domain: str) -> StsLookup:
        if not _MX_PATTERN.match(domain) or domain.startswith("*"):
            return StsLookup(None)  # an address literal, or nothing a file may be named after
        # One TXT lookup and fetch per domain at a time, however many deliveries wait for it;
        # shielded, so a delivery given up on does not cancel the others' lookup.
        task = self._inflight.get(domain)
        if task is None:
            task = asyncio.ensure_future(self._lookup(domain))
            self._inflight[domain] = task
            task.add_done_callback(lambda _: self._inflight.pop(domain, None))
        return await asyncio.shield(task)

    async def _lookup(self, domain: str) -> StsLookup:
        cached = self.cached(domain)
        valid = cached if cached is not None and cached.expires > self.clock() else None
        answered, ident = await self._txt_id(domain)
        if not answered or ident is None:
            # §5.1: no TXT (or no answer) does not end a cached policy; none cached, no policy.
            return StsLookup(valid)
        if valid is not None and valid.id == ident:
            return StsLookup(valid)
        try:
            policy = await self.fetch(domain, ident)
        except PolicyInvalid as exc:
            log.warning("MTA-STS policy of %s is invalid: %s", domain, exc)
            return StsLookup(valid, "sts-policy-invalid", str(exc))
        except FetchFailed as exc:
            log.warning("MTA-STS policy of %s could not be fetched: %s", domain, exc.detail)
            return StsLookup(valid, exc.result, exc.detail)
        self._store(domain, policy)
        return StsLookup(policy)


class FetchFailed(Exception):
    def __init__(self, result: str, detail: str) -> None:
        super().__init__(detail)
        self.result = result
        self.detail = detail
