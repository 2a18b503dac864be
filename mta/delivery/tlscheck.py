"""``mta tls check DOMAIN``: the outbound TLS policy that would apply to a domain, and why.

Owns the explanation only: it asks the same ``TlsPolicy`` direct delivery
uses (``mta.delivery.tlspolicy``) — the configured level, the STARTTLS
memory, the MTA-STS policy (fetched and cached as delivery would), the MX
hosts and their DANE records — and reports, per MX host, what a session
must prove or why the host would not be used.  It connects to no MX host.

Failure: ``explain`` never raises for DNS or HTTPS trouble; a failed MX
lookup is reported under ``error``.
"""

from __future__ import annotations

import datetime
from typing import Any

from mta.delivery.mx import LookupFailed, MxResolver
from mta.delivery.result import Outcome
from mta.delivery.tlspolicy import TlsPolicy
from mta.domains import normalise


def _when(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat(timespec="seconds")


async def explain(policy: TlsPolicy, mx: MxResolver, domain: str, max_hosts: int = 10) -> dict[str, Any]:
    domain = normalise(domain)
    domain_tls = await policy.domain(domain)
    out: dict[str, Any] = {"domain": domain, "level": domain_tls.level, "level_from": domain_tls.source,
                           "starttls_seen": _when(policy.seen.last_seen(domain)) if policy.seen else None,
                           "starttls_required_by_memory": domain_tls.seen,
                           "dane_enabled": policy.dane_resolver is not None, "mta_sts": None, "hosts": []}
    if domain_tls.sts is not None:
        sts = domain_tls.sts
        out["mta_sts"] = {"mode": sts.mode, "mx": list(sts.mx), "max_age": sts.max_age, "id": sts.id,
                          "expires": _when(sts.expires)}
    if domain_tls.sts_problem:
        out["mta_sts_problem"] = {"result": domain_tls.sts_problem, "detail": domain_tls.sts_detail}
    try:
        hosts = (await mx.mx_hosts(domain))[:max_hosts]
    except LookupFailed as exc:
        out["error"] = str(exc.reply)
        return out
    for host in hosts:
        plan = await policy.host(domain_tls, host)
        entry: dict[str, Any] = {"host": host.name, "preference": host.preference, "dnssec": host.secure}
        if isinstance(plan, Outcome):
            entry.update(used=False, reason=str(plan.reply),
                         tls_policy=plan.policy.policy if plan.policy else None,
                         tls_policy_result=plan.policy.result if plan.policy else None)
        else:
            entry.update(used=True, tls_policy=plan.policy, tls_policy_mode=plan.mode, starttls=plan.starttls,
                         tls_required=plan.required, verify_certificate=plan.verify_roots,
                         tlsa=[str(record) for record in plan.tlsa], why=plan.why or None,
                         reported_failure=plan.noted)
        out["hosts"].append(entry)
    return out


def render(report: dict[str, Any]) -> str:
    lines = [f"domain {report['domain']}: level {report['level']} (from {report['level_from']})"]
    if report.get("starttls_seen"):
        lines.append(f"  STARTTLS last seen {report['starttls_seen']}"
                     + ("; TLS required" if report["starttls_required_by_memory"] else ""))
    sts = report.get("mta_sts")
    if sts:
        lines.append(f"  MTA-STS: mode {sts['mode']}, mx {', '.join(sts['mx']) or '-'}, id {sts['id']}, "
                     f"cached until {sts['expires']}")
    else:
        lines.append("  MTA-STS: no policy")
    if report.get("mta_sts_problem"):
        problem = report["mta_sts_problem"]
        lines.append(f"  MTA-STS problem: {problem['result']}: {problem['detail']}")
    lines.append("  DANE: " + ("on (dns.dnssec)" if report["dane_enabled"] else "off (needs dns.dnssec: true)"))
    if report.get("error"):
        lines.append(f"  MX lookup failed: {report['error']}")
    for host in report["hosts"]:
        head = f"  mx {host['host']} (preference {host['preference']}, {'DNSSEC' if host['dnssec'] else 'insecure'})"
        if not host["used"]:
            lines.append(f"{head}: not used: {host['reason']}")
            continue
        if not host["starttls"]:
            what = "no TLS"
        elif host["tlsa"]:
            what = "TLS, certificate must match TLSA " + "; ".join(host["tlsa"])
        elif host["verify_certificate"]:
            what = "TLS with a certificate for the MX name from the roots"
        else:
            what = "TLS" + (" required" if host["tls_required"] else " when offered") + ", certificate not checked"
        if host["starttls"] and not host["tls_required"] and host["tls_policy"] != "mta-sts":
            what += "; plain text otherwise"
        mode = f" {host['tls_policy_mode']}" if host.get("tls_policy_mode") else ""
        why = f" ({host['why']})" if host.get("why") else ""
        lines.append(f"{head}: {host['tls_policy']}{mode}: {what}{why}")
    return "\n".join(lines)
