"""STARTTLS on a direct-delivery session, as its ``HostTls`` (``mta.delivery.tlspolicy``) says.

``upgrade`` runs STARTTLS (SNI: the MX host name) when the server offers it
and the policy wants it, checks the certificate — from the roots for the MX
name (mta-sts, verify) or against the TLSA records (dane) — and says EHLO
again.  It returns the ``PolicyVerdict`` for the session's events.

Failure: ``PolicyFailed`` with a ``454 4.7.4`` (no STARTTLS) or ``4.7.5``
(handshake or certificate) reply and the RFC 8460 result type, when the
policy requires TLS; ``Reconnect`` when the session is lost but another
one may go on — in plain text for level may (RFC 7435), relaxed after a
failure MTA-STS testing only reports.  The session is closed before either.
"""

from __future__ import annotations

import logging
import ssl

import aiosmtplib

from mta.delivery import dane
from mta.delivery.result import PolicyVerdict
from mta.delivery.tlspolicy import HostTls
from mta.obs.log import event
from mta.replies import Reply

log = logging.getLogger(__name__)

# OpenSSL's X509_V_ERR_* codes, as RFC 8460 result types.
_CERT_RESULTS = {62: "certificate-host-mismatch", 10: "certificate-expired", 2: "certificate-not-trusted",
                 18: "certificate-not-trusted", 19: "certificate-not-trusted", 20: "certificate-not-trusted",
                 21: "certificate-not-trusted"}


class PolicyFailed(Exception):
    def __init__(self, reply: Reply, verdict: PolicyVerdict) -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.verdict = verdict


class Reconnect(Exception):
    """Open the session again with this policy (``starttls=False``: plain text)."""

    def __init__(self, host_tls: HostTls) -> None:
        super().__init__(host_tls.policy)
        self.host_tls = host_tls


def cert_result(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _CERT_RESULTS.get(exc.verify_code, "validation-failure")
    return "validation-failure"


def _chain(smtp: aiosmtplib.SMTP) -> list[bytes]:
    """The certificates the server sent, leaf first (Python 3.13 names this ``get_unverified_chain``)."""
    ssl_object = smtp.get_transport_info("ssl_object")
    if ssl_object is None:
        return []
    inner = getattr(ssl_object, "_sslobj", ssl_object)
    certs = inner.get_unverified_chain() or []
    return [cert if isinstance(cert, bytes) else cert.public_bytes(ssl._ssl.ENCODING_DER) for cert in certs]


def report(host_tls: HostTls, remote: str, outcome: str, detail: str) -> None:
    """A failure MTA-STS testing lets through: logged as an event, so it shows before enforce is switched on."""
    event("tls_policy_report", level=logging.WARNING, remote=remote, tls_policy=host_tls.policy,
          tls_policy_mode=host_tls.mode, tls_policy_result=outcome, detail=detail)


async def upgrade(smtp: aiosmtplib.SMTP, host_tls: HostTls, mx_name: str, remote: str, *,
                  roots: ssl.SSLContext, unverified: ssl.SSLContext) -> PolicyVerdict:
    if not host_tls.starttls:
        return host_tls.verdict()
    if not smtp.supports_extension("starttls"):
        if host_tls.required:
            smtp.close()
            raise PolicyFailed(Reply(454, "4.7.4", f"{remote} does not offer STARTTLS, which {host_tls.why} "
                                     "requires; not sending in plain text"),
                               host_tls.verdict("starttls-not-supported"))
        if host_tls.testing:
            report(host_tls, remote, "starttls-not-supported", f"{remote} does not offer STARTTLS")
        return host_tls.verdict("starttls-not-supported")
    context = roots if host_tls.verify_roots else unverified
    try:
        await smtp.starttls(server_hostname=mx_name, tls_context=context, validate_certs=host_tls.verify_roots)
    except (aiosmtplib.SMTPException, ssl.SSLError, OSError) as exc:
        smtp.close()
        cause = exc.__cause__ or exc.__context__ or exc
        outcome = cert_result(exc if isinstance(exc, ssl.SSLError) else cause)
        if host_tls.required:
            raise PolicyFailed(Reply(454, "4.7.5", f"TLS with {remote} failed ({exc}); {host_tls.why} "
                                     "requires it"), host_tls.verdict(outcome)) from None
        if host_tls.testing:
            report(host_tls, remote, outcome, str(exc))
            raise Reconnect(host_tls.relaxed(outcome)) from None
        log.warning("STARTTLS with %s failed (%s); retrying in plain text", remote, exc)
        raise Reconnect(HostTls(host_tls.policy, starttls=False, mode=host_tls.mode, noted=outcome)) from None
    if host_tls.policy == "dane" and host_tls.tlsa:
        problem = dane.matches(host_tls.tlsa, _chain(smtp), [mx_name])
        if problem is not None:
            smtp.close()
            raise PolicyFailed(Reply(454, "4.7.5", f"the certificate of {remote} does not match its DANE TLSA "
                                     f"records: {problem}"),
                               # RFC 8460 §4.3.2: none of the TLSA records validated the certificate.
                               host_tls.verdict("tlsa-invalid"))
    # STARTTLS discards what the server said before (RFC 3207 §4.2): ask
    # again, or MAIL would go out without SIZE, BODY and SMTPUTF8.
    await smtp.ehlo()
    return host_tls.verdict()
