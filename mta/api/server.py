"""The HTTP send API listener: ``POST /v1/messages``, ``POST /v1/messages/raw``, ``GET /v1/messages/{id}``.

With ``feedback.esp`` it also takes providers' event webhooks, ``POST /v1/events/{provider}``
(``mta.api.esp_events``: each provider's own authentication, not an API key).

A submission is authenticated by an API key (``mta.api.keys``) or a
ServiceAccount token (a JWT as the Bearer credential, ``mta.auth.workload``,
with ``service_accounts.enabled``) before its body is read, held to the account's policy with the functions the SMTP
session calls (``mta.policy.account``: senders, From:, sizes, rates shared
with SMTP AUTH of the same name), prepared like SMTP mail
(``mta.receive``: Received, Authentication-Results, Message-ID, Date) and
put through the one intake (``mta.intake``); ``202 {"id": ...}`` comes only
after the message is durable.  A recipient on the suppression list gets the
same answer as at SMTP RCPT (``mta.policy.suppressed``).  ``Idempotency-Key`` answers are kept on the
spool volume (``mta.api.idempotency``), so a retried request is never
queued twice.

Bounds: a ``Content-Length`` above the limit is refused (413) before any
of the body is read, a chunked body is cut off at the limit; a request
header must be complete within ``HEADER_TIMEOUT`` of the connection's start
or of the previous response, a body within ``BODY_TIMEOUT`` (408).
Failure: every refusal is a JSON error (``mta.api.errors``); a local error
is 503 with ``4.3.0`` and the detail in the log with the queue id.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from types import SimpleNamespace
from typing import Any

from aiohttp import web

from mta import content, receive, replies
from mta.api import errors
from mta.api.compose import compose
from mta.api.errors import ApiError
from mta.api.esp_events import EspEvents
from mta.api.idempotency import MAX_KEY_LENGTH, IdempotencyStore
from mta.api.keys import ApiKeys
from mta.auth.workload import TokenRefused, looks_like_jwt
from mta.config import Config
from mta.intake import Envelope, Intake
from mta.obs.log import event
from mta.policy import account, address
from mta.policy.account import RateLimits
from mta.policy.admission import Admission
from mta.policy.suppressed import SuppressionCheck, held_attrs
from mta.policy.workloads import IdentityUnavailable, Principal, WorkloadIdentity
from mta.replies import Rejected
from spool import Record
from spool.ids import new_id

log = logging.getLogger(__name__)

HEADER_TIMEOUT = 30.0  # as the handoff endpoint: longer than clients keep idle connections
BODY_TIMEOUT = 120.0  # a floor on the transfer rate for the largest body, not a target
JSON_ALLOWANCE = 64 * 1024  # field names, headers and text beside the base64 attachments
LISTENER = "http_api"  # the listener name in events and the record's attrs
LINGERING_TIME = 1.0


def max_request_size(config: Config) -> int:
    configured = config.http_api.max_request_size
    # Base64 takes 4 bytes for 3.
    return configured if configured is not None else config.limits.max_message_size * 4 // 3 + JSON_ALLOWANCE


class ApiServer:
    def __init__(self, config: Config, intake: Intake, keys: ApiKeys, rates: RateLimits, *,
                 admission: Sequence[Admission] = (), records: Mapping[str, Record] | None = None,
                 idempotency: IdempotencyStore | None = None, stopping: Callable[[], bool] = lambda: False,
                 tls: ssl.SSLContext | None = None, header_timeout: float = HEADER_TIMEOUT,
                 body_timeout: float = BODY_TIMEOUT, suppression: SuppressionCheck | None = None,
                 workloads: WorkloadIdentity | None = None, esp_events: EspEvents | None = None) -> None:
        self.config = config
        self.intake = intake
        self.keys = keys
        self.rates = rates
        self.admission = list(admission)
        self.records = records if records is not None else {}
        self.idempotency = idempotency
        self.stopping = stopping
        self.tls = tls
        self.suppression = suppression
        self.workloads = workloads
        self.esp_events = esp_events
        self.header_timeout, self.body_timeout = header_timeout, body_timeout
        self.max_body = max_request_size(config)
        self.runner: web.AppRunner | None = None
        self.openapi = resources.files("mta.api").joinpath("openapi.json").read_bytes()

    async def start(self) -> None:
        app = web.Application(client_max_size=self.max_body)
        app.router.add_post("/v1/messages", self._json)
        app.router.add_post("/v1/messages/raw", self._raw)
        app.router.add_get("/v1/messages/{id}", self._status)
        app.router.add_get("/v1/openapi.json", self._openapi)
        if self.esp_events is not None:
            app.router.add_post("/v1/events/{provider}", self.esp_events.handle)
        # aiohttp's keep-alive timeout runs from the connection's start and
        # from each response until a request header is complete: the header timeout.
        # A body refused before it was read (413) is drained for lingering_time so that the client
        # sees the answer; aiohttp's 10 s would also hold up every shutdown that follows one.
        self.runner = web.AppRunner(app, access_log=None, keepalive_timeout=self.header_timeout,
                                    lingering_time=LINGERING_TIME)
        await self.runner.setup()
        host, port = self.config.http_api.host_port
        await web.TCPSite(self.runner, host, port, ssl_context=self.tls, reuse_address=True).start()
        log.info("HTTP send API on %s://%s:%d/v1/messages", "https" if self.tls else "http", host, port)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        if self.esp_events is not None:
            await self.esp_events.close()

    # -- routes -------------------------------------------------------------------

    async def _openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=self.openapi, content_type="application/json")

    async def _json(self, request: web.Request) -> web.Response:
        async def parse(body: bytes) -> tuple[str, list[str], bytes]:
            try:
                document = json.loads(body)
            except (ValueError, UnicodeDecodeError) as exc:
                raise errors.bad_request("invalid_json", f"the body is not JSON: {exc}") from None
            composed = compose(document)
            return composed.sender, composed.recipients, composed.data

        return await self._submit(request, parse)

    async def _raw(self, request: web.Request) -> web.Response:
        async def parse(body: bytes) -> tuple[str, list[str], bytes]:
            sender = request.query.get("from")
            recipients = request.query.getall("to", [])
            if sender is None:
                raise errors.bad_request("missing_field", "query parameter 'from' is required")
            if not recipients:
                raise errors.bad_request("missing_field", "query parameter 'to' is required (repeat it per recipient)")
            if not body.strip():
                raise errors.bad_request("missing_field", "the body must be an RFC 5322 message")
            return sender, recipients, body

        return await self._submit(request, parse)

    async def _authenticate(self, request: web.Request, client: str) -> Principal:
        """An API key's account, or the workload a ServiceAccount token proves; ``ApiError`` 401 or 503."""
        header = request.headers.get("Authorization")
        scheme, _, credential = (header or "").partition(" ")
        credential = credential.strip()
        if (self.workloads is not None and self.workloads.tokens is not None and scheme.lower() == "bearer"
                and looks_like_jwt(credential)):
            try:
                return await self.workloads.from_token(credential)
            except TokenRefused as exc:
                event("auth_failed", level=logging.WARNING, listener=LISTENER, client=client, mechanism="token",
                      reason=str(exc))
                raise errors.UNAUTHENTICATED from None
            except IdentityUnavailable as exc:
                event("auth_unavailable", level=logging.WARNING, listener=LISTENER, client=client, reason=str(exc))
                raise errors.IDENTITY_UNAVAILABLE from None
        user = await self.keys.authenticate(header, client)
        return Principal(user, self.config.accounts.policy(user))

    async def _status(self, request: web.Request) -> web.Response:
        client = request.remote or "?"
        try:
            user = (await self._authenticate(request, client)).name
        except ApiError as exc:
            return exc.response()
        record = self.records.get(request.match_info["id"])
        if record is None or record.attrs.get("user") != user:
            # Delivered and bounced messages leave the queue; another account's are not this one's to see.
            return errors.NOT_FOUND.response()
        return web.json_response({
            "id": record.id, "state": record.state, "sender": record.sender, "created": record.created,
            "expires": record.expires, "attempts": record.attempts, "next_attempt": record.next_attempt,
            "recipients": [{"address": r.address, "state": r.state, "last_reply": r.last_reply,
                            "remote": r.remote, "updated": r.updated} for r in record.recipients],
        })

    # -- a submission -------------------------------------------------------------

    async def _submit(self, request: web.Request, parse: Callable[[bytes], Any]) -> web.Response:
        client = request.remote or "?"
        if self.stopping():
            return errors.SHUTTING_DOWN.response()
        length = request.content_length
        if length is not None and length > self.max_body:
            return self._too_large(client, length)
        try:
            principal = await self._authenticate(request, client)
        except ApiError as exc:
            return exc.response()
        user = principal.name
        try:
            async with asyncio.timeout(self.body_timeout):
                body = await request.read()
        except TimeoutError:
            event("rejected", level=logging.WARNING, listener=LISTENER, client=client, user=user,
                  reason="body not received in time")
            response = ApiError(408, "body_timeout", "4.4.2", "request body not received in time").response()
            response.force_close()  # the rest of the body may still be on its way
            return response
        except web.HTTPRequestEntityTooLarge:  # a chunked body, cut off at the limit
            return self._too_large(client, None)
        key = request.headers.get("Idempotency-Key")
        if key is not None and not 0 < len(key) <= MAX_KEY_LENGTH:
            return errors.bad_request("invalid_idempotency_key",
                                      f"Idempotency-Key must have 1 to {MAX_KEY_LENGTH} characters").response()
        try:
            if key is not None and self.idempotency is not None:
                return await self._once(key, principal, client, request, body, parse)
            return await self._queue(principal, client, request, body, parse, new_id())
        except Exception as exc:  # every failure is answered
            error = errors.for_exception(exc)
            if not isinstance(exc, ApiError | Rejected):
                log.exception("HTTP API submission not queued")
            event("rejected", level=logging.WARNING, listener=LISTENER, client=client, user=user,
                  status=error.status, code=error.code, reason=str(exc) or type(exc).__name__)
            return error.response()

    def _too_large(self, client: str, length: int | None) -> web.Response:
        event("rejected", level=logging.WARNING, listener=LISTENER, client=client, size=length,
              reason=f"request body over {self.max_body} bytes")
        response = ApiError(413, "request_too_large", "5.3.4",
                            f"the request body may have at most {self.max_body} bytes").response()
        response.force_close()  # do not read the body just to throw it away
        return response

    async def _once(self, key: str, principal: Principal, client: str, request: web.Request, body: bytes,
                    parse: Callable[[bytes], Any]) -> web.Response:
        assert self.idempotency is not None
        user = principal.name
        async with self.idempotency.lock(user, key):
            known = await self.idempotency.get(user, key)
            if known is not None and (known.stored or known.queue_id in self.records):
                event("idempotent_replay", listener=LISTENER, client=client, user=user, queue_id=known.queue_id)
                return web.json_response({"id": known.queue_id}, status=202, headers={"Idempotent-Replayed": "true"})
            # Not stored yet (or a crash before it was): the same id again, so a copy can never be queued twice.
            queue_id = known.queue_id if known is not None else new_id()
            if known is None:
                await self.idempotency.reserve(user, key, queue_id)
            response = await self._queue(principal, client, request, body, parse, queue_id)
            await self.idempotency.stored(user, key)
            return response

    async def _queue(self, principal: Principal, client: str, request: web.Request, body: bytes,
                     parse: Callable[[bytes], Any], queue_id: str) -> web.Response:
        user = principal.name
        if principal.policy is None:
            raise errors.workload_not_allowed(user)
        policy = principal.policy
        sender, recipients, data = await parse(body)
        for check in self.admission:
            check()
        if len(data) > self.config.limits.max_message_size:
            raise ApiError(413, "message_too_large", "5.3.4",
                           f"the message may have at most {self.config.limits.max_message_size} bytes")
        address.parse_sender(sender)
        account.check_sender(policy, sender)
        unique: list[str] = []
        held = SimpleNamespace()  # where the suppression check notes recipients it holds, as on an SMTP envelope
        for rcpt in recipients:
            address.parse_recipient(rcpt)
            if rcpt.lower() in {r.lower() for r in unique}:
                continue
            account.check_recipient_count(policy, len(unique))
            if len(unique) >= self.config.limits.max_recipients:
                raise Rejected(replies.TOO_MANY_RECIPIENTS)
            if self.suppression is not None:  # the same list and answer as SMTP's RCPT
                try:
                    self.suppression(held, rcpt, sender, user, client)
                except Rejected as exc:
                    raise errors.suppressed(rcpt, exc.reply) from None
            unique.append(rcpt)
        checked = content.check(data, self.config.limits)  # the SMTP DATA content policy: repair or refuse
        account.check_message(policy, checked.data)
        holder = object()  # this request's reservation of the account's rates
        try:
            await self.rates.hold_message(policy, user, holder)
            await self.rates.hold_recipients(policy, user, holder, len(unique))
            tls = request.transport is not None and request.transport.get_extra_info("sslcontext") is not None
            arrival = receive.Arrival(queue_id=queue_id, helo="http-api", client_ip=client,
                                      hostname=self.config.hostname, protocol="HTTPS" if tls else "HTTP",
                                      recipients=tuple(unique), when=receive.now(), auth_user=user,
                                      authserv_id=self.config.authserv_id)
            prepared = receive.prepare(checked.data, arrival)
            envelope = Envelope(sender=sender, recipients=unique, attrs={
                "listener": LISTENER, "client": client, "helo": None, "user": user,
                **({"namespace": principal.namespace} if principal.namespace else {}),
                "smtputf8": not "".join([sender, *unique]).isascii(), "8bitmime": checked.eight_bit,
                "8bit": checked.eight_bit, "utf8_headers": checked.utf8_headers, "long_lines": checked.long_lines,
                **held_attrs(held)})
            await self.intake.settled(queue_id)  # an earlier id is the spool loader's until it is done
            if queue_id in self.records:  # an idempotent retry after a crash that had stored it
                stored = self.records[queue_id]
            else:
                stored = await self.intake.put(envelope, prepared, queue_id=queue_id)
            await self.rates.commit(holder, len(stored.recipients))
        finally:
            self.rates.release(holder)
        event("received", queue_id=queue_id, listener=LISTENER, client=client, user=user,
              namespace=principal.namespace, tls=tls,
              sender=stored.sender, recipients=len(stored.recipients), size=stored.size)
        return web.json_response({"id": queue_id}, status=202)
