"""Whether a report comes from where it says: SPF (pyspf) and DKIM (dkimpy), as Authentication-Results.

``check`` runs both, blocking (callers run it in a thread), against the
configured DNS servers:

- SPF of the envelope sender, or of ``postmaster@<HELO>`` for the null
  sender every DSN has (RFC 7208 §2.3);
- every DKIM signature (at most ``MAX_SIGNATURES``), each ``pass`` with its
  ``d=``, or ``fail``; ``none`` without one.

A report is ``trusted`` when either passed: only then may it suppress an
address (its return path's tag has already said it is about our mail).
``header`` is the ``Authentication-Results`` field (authres) put on the
report where it is kept.

Failure: DNS errors are results (``temperror``, ``permerror``), never
exceptions; an untrusted report is still recorded and emitted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import authres
import dkim
import dns.exception
import dns.resolver
import spf

MAX_SIGNATURES = 5
_DKIM_FIELD = re.compile(rb"^dkim-signature[ \t]*:", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class Verdict:
    spf: str
    dkim: list[tuple[str, str]]  # (result, d=)
    header: bytes

    @property
    def trusted(self) -> bool:
        return self.spf == "pass" or any(result == "pass" for result, _ in self.dkim)

    def fields(self) -> dict[str, str | bool]:
        """For the report's event."""
        return {"spf": self.spf, "dkim": ",".join(result for result, _ in self.dkim) or "none",
                "trusted": self.trusted}


def _txt(resolver: dns.resolver.Resolver):  # type: ignore[no-untyped-def]
    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        try:
            answer = resolver.resolve(name.decode(), "TXT", search=False, lifetime=timeout)
        except (dns.exception.DNSException, UnicodeError):
            return None
        return b"".join(next(iter(answer)).strings)
    return lookup


def check(data: bytes, client_ip: str, mail_from: str, helo: str, resolver: dns.resolver.Resolver,
          authserv_id: str) -> Verdict:
    sender = mail_from or f"postmaster@{helo}"
    # pyspf resolves through dnspython's default resolver.
    dns.resolver.default_resolver = resolver
    try:
        spf_result = spf.check2(i=client_ip, s=sender, h=helo)[0]
    except Exception:  # noqa: BLE001 - pyspf raises on malformed input (a bad address or HELO)
        spf_result = "permerror"
    dkim_results: list[tuple[str, str]] = []
    signer = dkim.DKIM(data)
    for index in range(min(len(_DKIM_FIELD.findall(data)), MAX_SIGNATURES)):
        try:
            passed = signer.verify(idx=index, dnsfunc=_txt(resolver))
        except dkim.DKIMException:
            passed = False
        domain = signer.domain.decode(errors="replace") if isinstance(signer.domain, bytes) else ""
        dkim_results.append(("pass" if passed else "fail", domain))
    results: list[authres.AuthenticationResult] = [
        authres.SPFAuthenticationResult(result=spf_result, smtp_mailfrom=mail_from or None,
                                        smtp_helo=helo if not mail_from else None)]
    results += [authres.DKIMAuthenticationResult(result=result, header_d=domain or None)
                for result, domain in dkim_results] or [authres.DKIMAuthenticationResult(result="none")]
    text = str(authres.AuthenticationResultsHeader(authserv_id=authserv_id, results=results))
    return Verdict(spf_result, dkim_results, re.sub(r"[\r\n]", "", text).encode() + b"\r\n")
