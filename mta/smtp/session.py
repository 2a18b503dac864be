"""What happens on each SMTP command of a session: policy, then the queue.

The aiosmtpd handler for one listener.  AUTH (PLAIN, LOGIN) checks the
credentials file off the event loop, with brute-force throttling per client
address and per user name; the user name ``serviceaccount`` says the
password is a ServiceAccount token (``mta.auth.workload``).  On a listener
with ``identify_pods`` a client that did not AUTH is known by its pod
(``mta.k8s.pods``).  Either way the session acts as a ``Principal``
(``mta.policy.workloads``): a name and its account policy; a pod's is
looked up once per transaction, at MAIL.  MAIL and RCPT check address syntax, the
account's policy and relay permission (a trusted network, or AUTH), and
reserve the account's rates (``mta.policy.account``: committed at ``250``,
given back by ``transaction_over`` when a transaction ends otherwise); DATA
repairs or refuses the content (``mta.content``), prepares the message
(``mta.receive``), puts it through the intake
(``mta.intake``: durable in the spool, then announced) and only then answers
``250 ... queued as ID``.  Every error, expected or not, becomes a reply
through ``mta.replies.for_exception``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session

from mta import content, receive, replies
from mta.auth.credentials import Credentials
from mta.auth.gate import AuthGate
from mta.auth.throttle import Throttle
from mta.auth.workload import SMTP_USER, TokenRefused
from mta.config import AccountPolicy, Config, LimitsConfig, ListenerConfig
from mta.intake import Envelope as QueuedEnvelope
from mta.intake import Taker
from mta.limits.store import LimitsStore
from mta.obs.log import event
from mta.policy import account, address, relay
from mta.policy.admission import Admission
from mta.policy.suppressed import SuppressionCheck, held_attrs
from mta.policy.workloads import IdentityUnavailable, Principal, WorkloadIdentity
from mta.replies import Rejected
from mta.smtp.dispatch import DispatchNames
from mta.smtp.dsnparams import queued_attrs
from spool.ids import new_id

log = logging.getLogger(__name__)

@dataclass
class AuthServices:
    """Shared by every AUTH listener of a process: one gate (and its throttle) and one rate counter."""

    gate: AuthGate
    rates: account.RateLimits

    @classmethod
    def build(cls, limits: LimitsConfig, store: LimitsStore | None = None) -> AuthServices:
        throttle = Throttle(limits.max_auth_failures, limits.auth_failure_window, store=store)
        return cls(AuthGate(throttle), account.RateLimits(store=store))


def client_address(session: Session) -> str:
    """The client's IP; behind a load balancer, the one its PROXY header names."""
    proxy = getattr(session, "proxy_data", None)
    if proxy is not None and getattr(proxy, "src_addr", None):
        return str(proxy.src_addr)
    peer: Any = session.peer
    return str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)


def is_tls(server: SMTP) -> bool:
    transport = server.transport
    return bool(transport is not None and transport.get_extra_info("sslcontext"))


class SessionHandler(DispatchNames):
    def __init__(self, listener: ListenerConfig, config: Config, intake: Taker,
                 admission: Sequence[Admission] = (), *, credentials: Credentials | None = None,
                 services: AuthServices | None = None, suppression: SuppressionCheck | None = None,
                 workloads: WorkloadIdentity | None = None) -> None:
        self.listener = listener
        self.workloads = workloads
        self.suppression = suppression
        self.config = config
        self.intake = intake
        self.admission = list(admission)
        if (listener.auth is not None or listener.identify_pods) and services is None:
            raise ValueError("a listener with AUTH or identify_pods needs the process's AuthServices")
        self.credentials = credentials  # None on an AUTH listener: only ServiceAccount tokens log in
        self.offers_auth = listener.auth is not None
        self._services = services
        # identify_pods: the principal of each open transaction, found at MAIL (None: no pod has the address).
        self._pod_principals: dict[Session, Principal | None] = {}

    @property
    def services(self) -> AuthServices:
        # Only authenticated sessions use them, and only AUTH listeners have those.
        assert self._services is not None
        return self._services

    # -- greeting and PROXY ----------------------------------------------------

    async def handle_PROXY(self, server: SMTP, session: Session, envelope: Envelope, proxy_data: Any) -> bool:
        # A malformed or missing header has already been refused by aiosmtpd.
        return bool(proxy_data and getattr(proxy_data, "valid", False))

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        # aiosmtpd lists SIZE, 8BITMIME, SMTPUTF8, STARTTLS and AUTH; AUTH only
        # on listeners with ``auth``, and PIPELINING,
        # ENHANCEDSTATUSCODES and DSN (``mta.smtp.dsnparams``) are ours to announce.
        last = responses.pop()  # "250 HELP"
        if not self.offers_auth:
            responses = [r for r in responses if not r.startswith("250-AUTH")]
        responses += ["250-PIPELINING", "250-ENHANCEDSTATUSCODES", "250-DSN", last]
        return responses

    # -- AUTH ------------------------------------------------------------------

    async def handle_AUTH(self, server: SMTP, session: Session, envelope: Envelope, args: list[str]) -> str | None:
        """Both mechanisms, run here so that scrypt never blocks the event loop (``mta.auth.gate``)."""
        if not self.offers_auth:
            return str(replies.AUTH_UNAVAILABLE)
        if envelope.mail_from:
            return str(replies.AUTH_IN_TRANSACTION)
        ip = client_address(session)
        gate = self.services.gate
        if await gate.client_locked(ip):
            event("auth_throttled", level=logging.WARNING, listener=self.listener.name, client=ip, scope="client")
            await server.push(str(replies.AUTH_CLIENT_LOCKED))
            if server.transport is not None:
                server.transport.close()
            return None
        mechanism = args[0].upper()
        initial = args[1] if len(args) > 1 else None
        async with gate.attempt(ip):
            try:
                if mechanism == "PLAIN":
                    user, password = await self._plain(server, initial)
                else:
                    user, password = await self._login(server, initial)
            except Rejected as exc:
                return str(exc.reply)
            if user == SMTP_USER and self.workloads is not None and self.workloads.tokens is not None:
                return await self._token_login(session, ip, password)
            async with gate.checking(user):
                if await gate.user_locked(user, ip):
                    event("auth_throttled", level=logging.WARNING, listener=self.listener.name, client=ip,
                          user=user, scope="user")
                    return str(replies.AUTH_USER_LOCKED)
                ok = self.credentials is not None and await gate.verify(self.credentials.verify, user, password)
                if ok:
                    await gate.succeeded(user, ip)
                else:
                    await gate.failed(user, ip)
        if not ok:
            event("auth_failed", level=logging.WARNING, listener=self.listener.name, client=ip, user=user,
                  mechanism=mechanism)
            # Slow the guesser down without holding anyone else up.
            await asyncio.sleep(self.config.limits.auth_failure_delay)
            return str(replies.AUTH_FAILED)
        session.authenticated = True
        session.auth_data = Principal(user, self.config.accounts.policy(user))
        event("auth_ok", listener=self.listener.name, client=ip, user=user, mechanism=mechanism)
        return str(replies.AUTH_OK)

    async def _token_login(self, session: Session, ip: str, token: str) -> str:
        """AUTH as ``serviceaccount``: the password is a token; failures count as password failures do."""
        assert self.workloads is not None
        gate = self.services.gate
        try:
            principal = await self.workloads.from_token(token.strip())
        except TokenRefused as exc:
            await gate.failed(SMTP_USER, ip)
            event("auth_failed", level=logging.WARNING, listener=self.listener.name, client=ip, user=SMTP_USER,
                  mechanism="token", reason=str(exc))
            await asyncio.sleep(self.config.limits.auth_failure_delay)
            return str(replies.AUTH_FAILED)
        except IdentityUnavailable as exc:
            event("auth_unavailable", level=logging.WARNING, listener=self.listener.name, client=ip,
                  reason=str(exc))
            return str(replies.AUTH_TEMPORARY)
        session.authenticated = True
        session.auth_data = principal
        event("auth_ok", listener=self.listener.name, client=ip, user=principal.name, mechanism="token",
              namespace=principal.namespace, policy=principal.policy is not None)
        return str(replies.AUTH_OK)

    @staticmethod
    def _decode(blob: bytes | str) -> bytes:
        try:
            return base64.b64decode(blob, validate=True)
        except (binascii.Error, ValueError):
            raise Rejected(replies.AUTH_BAD_RESPONSE) from None

    async def _challenge(self, server: SMTP, prompt: str) -> bytes:
        answer = await server.challenge_auth(prompt)
        if answer is MISSING:
            raise Rejected(replies.AUTH_ABORTED)
        assert isinstance(answer, bytes)
        return answer

    async def _plain(self, server: SMTP, initial: str | None) -> tuple[str, str]:
        if initial is None or initial == "=":
            raw = await self._challenge(server, "") if initial is None else b""
        else:
            raw = self._decode(initial)
        parts = raw.split(b"\x00")
        if len(parts) != 3:
            raise Rejected(replies.AUTH_BAD_RESPONSE)
        _, user, password = parts
        return user.decode("utf-8", "replace"), password.decode("utf-8", "replace")

    async def _login(self, server: SMTP, initial: str | None) -> tuple[str, str]:
        user = self._decode(initial) if initial else await self._challenge(server, "Username:")
        password = await self._challenge(server, "Password:")
        return user.decode("utf-8", "replace"), password.decode("utf-8", "replace")

    # -- the transaction -------------------------------------------------------------

    async def _principal(self, session: Session) -> Principal | None:
        """Who the session acts as: its AUTH, else (``identify_pods``) its pod; None: neither."""
        if session.authenticated and isinstance(session.auth_data, Principal):
            return session.auth_data
        if not self.listener.identify_pods or self.workloads is None:
            return None
        if session in self._pod_principals:
            return self._pod_principals[session]
        try:
            principal = await self.workloads.from_address(client_address(session))
        except IdentityUnavailable as exc:
            raise Rejected(replies.POD_UNKNOWN_YET, str(exc)) from None
        self._pod_principals[session] = principal
        return principal

    @staticmethod
    def _policy(principal: Principal) -> AccountPolicy:
        if principal.policy is None:
            raise Rejected(replies.workload_without_policy(principal.name), principal.name)
        return principal.policy

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address_text: str,
                          mail_options: list[str]) -> str:
        for check in self.admission:
            check()
        address.parse_sender(address_text)
        principal = await self._principal(session)
        if principal is not None:
            try:
                policy = self._policy(principal)
                account.check_sender(policy, address_text)
                await self.services.rates.hold_message(policy, principal.name, session)
            except Rejected as exc:
                self._rejected(session, exc, sender=address_text, user=principal.name)
                raise
        # aiosmtpd needs a truthy mail_from to allow RCPT; "<>" stays "<>" until DATA.
        envelope.mail_from = address_text
        envelope.mail_options.extend(mail_options)
        return str(replies.SENDER_OK)

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address_text: str,
                          rcpt_options: list[str]) -> str:
        rcpt = address.parse_recipient(address_text)
        if self.listener.mode == "feedback":
            return self._feedback_recipient(session, envelope, address_text, rcpt_options)
        principal = await self._principal(session)
        user = principal.name if principal is not None else None
        try:
            if principal is None:
                relay.check_relay(client_address(session), self.listener.trusted_networks)
            else:
                policy = self._policy(principal)
                account.check_recipient_count(policy, len(envelope.rcpt_tos))
                await self.services.rates.hold_recipients(policy, principal.name, session,
                                                          len(envelope.rcpt_tos) + 1)
        except Rejected as exc:
            self._rejected(session, exc, recipient=address_text, user=user)
            raise
        if self.suppression is not None:
            self.suppression(envelope, address_text, envelope.mail_from or "", user, client_address(session))
        if len(envelope.rcpt_tos) >= self.config.limits.max_recipients:
            raise Rejected(replies.TOO_MANY_RECIPIENTS)
        if str(rcpt).lower() not in {r.lower() for r in envelope.rcpt_tos}:
            envelope.rcpt_tos.append(address_text)
            envelope.rcpt_options.extend(rcpt_options)
        return str(replies.RECIPIENT_OK)

    def _feedback_recipient(self, session: Session, envelope: Envelope, address_text: str,
                            rcpt_options: list[str]) -> str:
        """A feedback listener takes any local part of feedback.domain (return paths, fbl@, abuse@) and nothing else."""
        domain = address_text.strip("<>").rpartition("@")[2].lower().rstrip(".")
        if domain != self.config.feedback.domain:
            exc = Rejected(replies.RELAY_DENIED, f"not the feedback domain: {domain}")
            self._rejected(session, exc, recipient=address_text)
            raise exc
        if len(envelope.rcpt_tos) >= self.config.limits.max_recipients:
            raise Rejected(replies.TOO_MANY_RECIPIENTS)
        envelope.rcpt_tos.append(address_text)
        envelope.rcpt_options.extend(rcpt_options)
        return str(replies.RECIPIENT_OK)

    def transaction_over(self, session: Session) -> None:
        """The transaction ended (DATA, RSET, HELO/EHLO, disconnect): its uncommitted reservations go back."""
        self._pod_principals.pop(session, None)
        if self._services is not None:
            self._services.rates.release(session)

    def _rejected(self, session: Session, exc: Rejected, **fields: Any) -> None:
        event("rejected", level=logging.WARNING, listener=self.listener.name, client=client_address(session),
              reply=str(exc.reply), reason=exc.detail, **fields)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        queue_id = new_id()
        client = client_address(session)
        user: str | None = None
        namespace: str | None = None
        pod: str | None = None  # the pod a client that did not AUTH was known by
        try:
            principal = await self._principal(session)
            if principal is not None:
                user, namespace = principal.name, principal.namespace
                if not session.authenticated and principal.workload is not None:
                    pod = f"{principal.workload.namespace}/{principal.workload.pod}"
            checked = content.check(envelope.original_content or b"", self.config.limits)
            if checked.repairs:
                event("repaired", queue_id=queue_id, listener=self.listener.name, client=client,
                      repairs=list(checked.repairs))
            if principal is not None:
                account.check_message(self._policy(principal), checked.data)
            protocol = "ESMTP" if session.extended_smtp else "SMTP"
            if is_tls(server):
                protocol += "S"
            if session.authenticated:
                protocol += "A"
            arrival = receive.Arrival(
                queue_id=queue_id,
                helo=session.host_name or "unknown",
                client_ip=client,
                hostname=self.config.hostname,
                protocol=protocol,
                recipients=tuple(envelope.rcpt_tos),
                when=receive.now(),
                auth_user=user,
                client_pod=pod,
                authserv_id=self.config.authserv_id,
            )
            prepared = receive.prepare(checked.data, arrival)
            options = {o.upper() for o in envelope.mail_options}
            dsn, recipient_dsn = queued_attrs(envelope)
            queued = QueuedEnvelope(
                sender="" if envelope.mail_from in (None, "", "<>") else envelope.mail_from,
                recipients=envelope.rcpt_tos,
                attrs={
                    "listener": self.listener.name,
                    "client": client,
                    "helo": session.host_name,
                    "user": user,
                    **({"namespace": namespace} if namespace else {}),
                    "smtputf8": bool(envelope.smtp_utf8),
                    "8bitmime": "BODY=8BITMIME" in options,
                    **held_attrs(envelope),
                    **dsn,
                    # Measured at DATA (mta.content): what delivery needs to know without a rescan.
                    "8bit": checked.eight_bit,
                    "utf8_headers": checked.utf8_headers,
                    "long_lines": checked.long_lines,
                },
                recipient_attrs=recipient_dsn,
            )
            stored = await self.intake.put(queued, prepared, queue_id=queue_id)
        except Exception as exc:  # noqa: BLE001 - every failure must still get a reply
            reply = replies.for_exception(exc)
            if not isinstance(exc, Rejected):
                log.error("queue_id=%s not queued: %r", queue_id, exc)
            event("rejected", level=logging.WARNING, queue_id=queue_id, listener=self.listener.name,
                  client=client, user=user, reply=str(reply), reason=str(exc) or type(exc).__name__)
            return str(reply)
        if user is not None:
            await self.services.rates.commit(session, len(stored.recipients))
        event("received", queue_id=queue_id, listener=self.listener.name, client=client,
              helo=session.host_name, user=user, namespace=namespace, tls=is_tls(server),
              sender=stored.sender or "<>",
              recipients=len(stored.recipients), size=stored.size)
        return str(replies.queued(queue_id))

    async def handle_exception(self, error: Exception) -> str:
        reply = replies.for_exception(error)
        if isinstance(error, Rejected):
            log.info("rejected: %s (%s)", reply, error.detail)
        else:
            log.exception("session error")
        return str(reply)
