"""DANE for SMTP (RFC 7672): an MX host's TLSA records and whether a TLS session matches them.

``lookup`` asks for ``_<port>._tcp.<mx host>`` TLSA.  Only an answer with
the AD bit counts, from the validating resolver in ``dns.nameservers``
(``dns.dnssec: true``).  kubemta does not validate DNSSEC itself: a full
validator (the chain of DS and DNSKEY records from the root, NSEC and NSEC3
proofs that a record does not exist) is what unbound, Knot Resolver or
the cluster's resolver already do well, and dnspython only checks single
signatures.  So the AD bit is believed only from a resolver on a trusted
path: in the pod, on the node, or the cluster's DNS service.

``matches`` checks the chain the server sent: DANE-EE (usage 3) compares
the leaf certificate or its public key, with no name or date checks
(§3.1.1); DANE-TA (usage 2) finds the trust anchor in the chain and
verifies the chain from it, leaf names against the MX host name (§3.2.2).
PKIX usages 0 and 1 are unusable for SMTP (§3.1.3) and ignored.

Failure: ``lookup`` never raises: a failed lookup (SERVFAIL, which is also
what a validating resolver answers for a bogus signature) comes back as
``TlsaAnswer.failed``; ``matches`` returns why nothing matched, or None.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.resolver
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.verification import Criticality, ExtensionPolicy, PolicyBuilder, Store, VerificationError

DANE_TA, DANE_EE = 2, 3
# Names are checked against subjectAltName, so it must be there; critical or not, as CAs issue it.
_LEAF_POLICY = ExtensionPolicy.permit_all().require_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)


@dataclass(frozen=True)
class Tlsa:
    usage: int
    selector: int  # 0: the whole certificate, 1: its SubjectPublicKeyInfo
    mtype: int  # 0: exact, 1: SHA-256, 2: SHA-512
    data: bytes

    @property
    def usable(self) -> bool:
        return self.usage in (DANE_TA, DANE_EE) and self.selector in (0, 1) and self.mtype in (0, 1, 2)

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()[:16]}..."


@dataclass(frozen=True)
class TlsaAnswer:
    records: tuple[Tlsa, ...] = ()  # DNSSEC-validated records (usable or not); empty: DANE does not apply
    insecure: bool = False  # records came back without the AD bit: ignored, as if there were none
    failed: str | None = None  # the lookup failed: the host cannot be used under DANE

    @property
    def usable(self) -> tuple[Tlsa, ...]:
        return tuple(record for record in self.records if record.usable)


def tlsa_name(host: str, port: int) -> str:
    return f"_{port}._tcp.{host.rstrip('.')}"


async def lookup(resolver: dns.asyncresolver.Resolver, host: str, port: int) -> TlsaAnswer:
    name = tlsa_name(host, port)
    try:
        answer = await resolver.resolve(name, "TLSA", search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return TlsaAnswer()
    except dns.exception.DNSException as exc:
        return TlsaAnswer(failed=f"TLSA lookup of {name} failed: {exc}")
    records = tuple(Tlsa(r.usage, r.selector, r.mtype, bytes(r.cert)) for r in answer)
    if not answer.response.flags & dns.flags.AD:
        return TlsaAnswer(insecure=True)
    return TlsaAnswer(records)


def _digest(mtype: int, data: bytes) -> bytes:
    if mtype == 1:
        return hashlib.sha256(data).digest()
    if mtype == 2:
        return hashlib.sha512(data).digest()
    return data


def _selected(selector: int, cert: x509.Certificate) -> bytes:
    if selector == 1:
        return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return cert.public_bytes(Encoding.DER)


def _association(record: Tlsa, cert: x509.Certificate) -> bool:
    return _digest(record.mtype, _selected(record.selector, cert)) == record.data


def matches(records: Sequence[Tlsa], chain_der: Sequence[bytes], names: Sequence[str],
            now: datetime.datetime | None = None) -> str | None:
    """None when the chain (leaf first) matches one usable record; otherwise why not."""
    if not chain_der:
        return "the server sent no certificate"
    try:
        chain = [x509.load_der_x509_certificate(der) for der in chain_der]
    except ValueError as exc:
        return f"the server's certificate does not parse: {exc}"
    leaf = chain[0]
    usable = [record for record in records if record.usable]
    if any(record.usage == DANE_EE and _association(record, leaf) for record in usable):
        return None
    anchors = [cert for cert in chain[1:]
               if any(record.usage == DANE_TA and _association(record, cert) for record in usable)]
    if not anchors:
        return "no certificate in the chain matches the TLSA records"
    moment = now or datetime.datetime.now(datetime.UTC)
    problems = []
    for name in names:
        try:
            # The leaf's extensions are not held to the Web PKI's profile: DANE-TA is
            # for private CAs, and RFC 7672 asks for the chain and the names only.
            verifier = (PolicyBuilder().store(Store(anchors)).time(moment)
                        .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(),
                                            ee_policy=_LEAF_POLICY)
                        .build_server_verifier(x509.DNSName(name.rstrip("."))))
            verifier.verify(leaf, chain[1:])
            return None
        except (VerificationError, ValueError) as exc:
            problems.append(f"{name}: {exc}")
    return "the chain does not verify from the DANE-TA trust anchor: " + "; ".join(problems)
