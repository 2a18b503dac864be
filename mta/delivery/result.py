"""The result of a delivery attempt for one recipient.

An ``Outcome`` is what the courier reports and the scheduler decides on: a
kind (delivered, try again later, never), the typed reply that says why —
the remote server's, or our own wording when no server answered — and,
when a server was reached, its MX host name, its address and the session's
TLS, and for direct delivery the outbound TLS policy that applied and how
it went (``PolicyVerdict``).  Failure: none; these are values.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from mta import replies
from mta.replies import Reply


class Kind(Enum):
    DELIVERED = "delivered"
    TRANSIENT = "transient"  # try again later
    PERMANENT = "permanent"  # never: bounce


@dataclass(frozen=True)
class Tls:
    version: str
    cipher: str | None


@dataclass(frozen=True)
class PolicyVerdict:
    """The outbound TLS policy an attempt ran under (``mta.delivery.tlspolicy``) and its result."""

    policy: str  # dane | mta-sts | verify | encrypt | may | none
    mode: str | None = None  # the MTA-STS mode: enforce | testing
    # "ok", or why not, in RFC 8460's words: starttls-not-supported, certificate-host-mismatch,
    # certificate-expired, certificate-not-trusted, validation-failure, tlsa-invalid, dnssec-invalid,
    # dane-required, sts-policy-fetch-error, sts-policy-invalid, sts-webpki-invalid
    result: str = "ok"

    def fields(self) -> dict[str, str]:
        """As event fields."""
        out = {"tls_policy": self.policy, "tls_policy_result": self.result}
        if self.mode is not None:
            out["tls_policy_mode"] = self.mode
        return out


@dataclass(frozen=True)
class Outcome:
    kind: Kind
    reply: Reply
    mx_host: str | None = None  # the server's name ("mx.example.com"; a relay's "host:port")
    mx_ip: str | None = None  # the address connected to, when known
    tls: Tls | None = None  # the session's TLS, when a session carried the transaction
    answered: bool = False  # the reply is the server's own, not our wording about it
    # Delivered to a server that offers DSN, with the client's DSN request
    # (RFC 3461 §5.2.1): its success notice is that server's to send, not ours.
    dsn_passed: bool = False
    policy: PolicyVerdict | None = None  # direct delivery: the TLS policy and its result

    @property
    def remote(self) -> str | None:
        return remote_name(self.mx_host, self.mx_ip)

    @property
    def enhanced(self) -> str:
        """The enhanced status code, from the reply or a default for the kind."""
        if self.reply.enhanced:
            return self.reply.enhanced
        return {Kind.DELIVERED: "2.0.0", Kind.TRANSIENT: "4.0.0", Kind.PERMANENT: "5.0.0"}[self.kind]

    def log_fields(self) -> dict[str, Any]:
        """What a delivery event (delivered, bounced, deferred) says about this outcome."""
        fields: dict[str, Any] = {"remote": self.remote}
        if self.mx_ip is not None:
            fields.update(mx_host=self.mx_host, mx_ip=self.mx_ip)
        if self.tls is not None:
            fields.update(tls=True, tls_version=self.tls.version, tls_cipher=self.tls.cipher)
        elif self.mx_host is not None or self.mx_ip is not None:
            fields["tls"] = False
        if self.policy is not None:
            fields.update(self.policy.fields())
        fields.update(reply=str(self.reply), code=self.reply.code, enhanced=self.enhanced)
        return fields


def remote_name(mx_host: str | None, mx_ip: str | None) -> str | None:
    """``mx.example.com[192.0.2.1]`` (``[192.0.2.1]`` for an address literal, a relay's ``host:port``),
    as logs and DSNs name a server; None when none answered."""
    if mx_ip is not None:
        return f"{mx_host or ''}[{mx_ip}]"
    return mx_host


def transient(code: int, enhanced: str, text: str) -> Outcome:
    """A failure of our own wording that may go away (no server answered for it)."""
    return Outcome(Kind.TRANSIENT, Reply(code, enhanced, text))


def permanent(code: int, enhanced: str, text: str) -> Outcome:
    """A failure of our own wording that will not go away."""
    return Outcome(Kind.PERMANENT, Reply(code, enhanced, text))


def from_reply(reply: Reply, mx_host: str | None = None, mx_ip: str | None = None,
               tls: Tls | None = None, *, answered: bool = False, policy: PolicyVerdict | None = None) -> Outcome:
    """Classify a reply by its first digit."""
    if reply.positive:
        kind = Kind.DELIVERED
    elif reply.permanent:
        kind = Kind.PERMANENT
    else:
        kind = Kind.TRANSIENT
    return Outcome(kind, reply, mx_host, mx_ip, tls, answered, policy=policy)


def from_server(code: int, message: str, mx_host: str | None = None, mx_ip: str | None = None,
                tls: Tls | None = None, policy: PolicyVerdict | None = None) -> Outcome:
    """A server's reply as aiosmtplib reports it."""
    return from_reply(replies.from_server(code, message), mx_host, mx_ip, tls, answered=True, policy=policy)
