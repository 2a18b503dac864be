"""The handoff endpoint: takes another pod's queued mail into this spool.

Listens on ``drain.listen``.  A verified request goes through the intake
(``Intake.put_record``: stored durably, fsync before the answer, then
announced to the scheduler), keeping the record's per-recipient state,
attempts, next attempt and expiry; the scheduler delivers it when it is
due, nothing is retried early.  An id this pod already holds is answered ``duplicate`` and not
stored twice, so a sender may safely repeat a request.

Before a byte of the body is read, the request must declare its length
(``Content-Length``, at most the largest message and its record) and carry
a valid signature over its headers (``mta.drain.wire``): signed for this
pod, a timestamp within ``wire.MAX_SKEW`` and a nonce not seen in the
replay window.  A refused request is answered at once and its connection
closed, without reading the rest.  With ``drain.tls`` the endpoint speaks
only TLS, and with ``client_ca_file`` it asks every client for a
certificate that chains to it.

Answers: 200 ``accepted``/``duplicate``; 401 bad or missing signature, a
request signed for another pod, a stale timestamp, a replayed nonce, a
body other than the one signed; 411 no ``Content-Length``; 413 a body over
the limit; 400 a malformed record; 408 when the body does not arrive
within ``BODY_TIMEOUT``; 503 while this pod shuts down or when the nonce
log is full; 500 when the spool cannot store it (the sender keeps the
message and tries another pod).  A request header must be complete within
``HEADER_TIMEOUT`` of the connection's start or of the previous response,
or the connection is closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Container

from aiohttp import web

from mta.drain import wire
from mta.intake import Intake
from mta.obs.log import event
from mta.smtp.tls import ServerTls
from spool import SpoolError

log = logging.getLogger(__name__)

METADATA_ALLOWANCE = 1024 * 1024
# Longer than aiohttp's client keeps an idle connection (15 s), so a sender
# never reuses a connection this end is closing.
HEADER_TIMEOUT = 30.0
# The largest body (a message of max_message_size and its record) crosses a
# cluster network in seconds; this is a floor on the rate, not a target.
BODY_TIMEOUT = 120.0
TLS_RELOAD_INTERVAL = 60.0  # how often a renewed certificate file is looked for


def _refused(status: int, error: str) -> web.Response:
    # Closed after the answer: the rest of the body is never read.
    return web.json_response({"error": error}, status=status, headers={"Connection": "close"})


class HandoffServer:
    def __init__(self, host: str, port: int, secret: bytes, intake: Intake, queued: Container[str],
                 max_message_size: int, stopping: Callable[[], bool], *, pod_name: str,
                 tls: ServerTls | None = None, header_timeout: float = HEADER_TIMEOUT,
                 body_timeout: float = BODY_TIMEOUT) -> None:
        self.header_timeout, self.body_timeout = header_timeout, body_timeout
        self.pod_name = pod_name  # requests must be signed for this name
        self.tls = tls
        self.nonces = wire.NonceLog()
        self.host, self.port = host, port
        self.secret = secret
        self.intake = intake
        self.queued = queued  # the ids this pod holds
        self.max_body = max_message_size + METADATA_ALLOWANCE
        self.stopping = stopping
        self.runner: web.AppRunner | None = None
        self._reloads: asyncio.Task[None] | None = None

    async def start(self) -> None:
        app = web.Application(client_max_size=self.max_body)
        app.router.add_post(wire.PATH, self._handoff)
        # aiohttp's keep-alive timeout runs from the connection's start and
        # from each response until a request header is complete.
        # lingering_time=0: aiohttp would otherwise read (and drop) the rest of
        # a refused request's body for up to 10 s before closing.
        self.runner = web.AppRunner(app, access_log=None, keepalive_timeout=self.header_timeout, lingering_time=0)
        await self.runner.setup()
        context = self.tls.context if self.tls is not None else None
        await web.TCPSite(self.runner, self.host, self.port, reuse_address=True, ssl_context=context).start()
        if self.tls is not None:
            self._reloads = asyncio.create_task(self._reload_certificate(self.tls))
        log.info("handoff endpoint on %s:%d%s", self.host, self.port, " (TLS)" if self.tls else "")

    @staticmethod
    async def _reload_certificate(tls: ServerTls) -> None:
        # aiohttp holds one context for the site; a renewed certificate is
        # loaded into it (ServerTls.current), so new handshakes use it.
        while True:
            await asyncio.sleep(TLS_RELOAD_INTERVAL)
            tls.current()

    async def stop(self) -> None:
        if self._reloads is not None:
            self._reloads.cancel()
            self._reloads = None
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def _handoff(self, request: web.Request) -> web.Response:
        peer = request.remote or "?"
        if self.stopping():
            return web.json_response({"error": "shutting down"}, status=503)
        length = request.content_length
        if length is None or "chunked" in request.headers.get("Transfer-Encoding", "").lower():
            event("handoff_refused", level=logging.WARNING, client=peer, reason="no Content-Length")
            return _refused(411, "Content-Length required")
        if length > self.max_body:
            event("handoff_refused", level=logging.WARNING, client=peer, reason=f"body of {length} bytes")
            return _refused(413, "request body too large")
        try:
            nonce = wire.verify_headers(self.secret, request.headers, length, self.pod_name)
            self.nonces.add(nonce)
        except wire.WireError as exc:
            event("handoff_refused", level=logging.WARNING, client=peer, reason=str(exc))
            return _refused(401, "not authenticated")
        except wire.NonceLogFull as exc:
            event("handoff_refused", level=logging.WARNING, client=peer, reason=str(exc))
            return _refused(503, "too many handoffs, try again later")
        try:
            async with asyncio.timeout(self.body_timeout):
                body = await request.read()
        except TimeoutError:
            event("handoff_refused", level=logging.WARNING, client=peer, reason="body not received in time")
            return _refused(408, "request body too slow")
        try:
            wire.verify_body(request.headers, body)
        except wire.WireError as exc:
            event("handoff_refused", level=logging.WARNING, client=peer, reason=str(exc))
            return _refused(401, "not authenticated")
        try:
            record, message = wire.decode(body)
        except wire.WireError as exc:
            event("handoff_refused", level=logging.WARNING, client=peer, reason=str(exc))
            return web.json_response({"error": str(exc)}, status=400)
        await self.intake.settled(record.id)  # this spool's own earlier mail may still be loading
        if record.id in self.queued:
            event("handoff_duplicate", queue_id=record.id, client=peer)
            return web.json_response({"result": "duplicate", "id": record.id})
        try:
            stored = await self.intake.put_record(record, message)
        except SpoolError as exc:
            log.error("queue_id=%s handoff not stored: %s", record.id, exc)
            return web.json_response({"error": "cannot store"}, status=500)
        event("handoff_accepted", queue_id=stored.id, client=peer, state=stored.state, attempts=stored.attempts,
              pending=len(stored.pending()), recipients=len(stored.recipients))
        return web.json_response({"result": "accepted", "id": stored.id})
