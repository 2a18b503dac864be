"""The handoff endpoint: takes another pod's queued mail into this spool.

Listens on ``drain.listen``.  A verified request goes through the intake
(``Intake.put_record``: stored durably, fsync before the answer, then
announced to the scheduler), keeping the record's per-recipient state,
attempts, next attempt and expiry; the scheduler delivers it when it is
due, nothing is retried early.  An id this pod already holds is answered ``duplicate`` and not
stored twice, so a sender may safely repeat a request.

Answers: 200 ``accepted``/``duplicate``; 401 bad or missing signature; 400
a malformed record; 408 when the body does not arrive within
``BODY_TIMEOUT``; 503 while this pod shuts down; 500 when the spool cannot
store it (the sender keeps the message and tries another pod).  A request
header must be complete within ``HEADER_TIMEOUT`` of the connection's start
or of the previous response, or the connection is closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Container

from aiohttp import web

from mta.drain import wire
from mta.intake import Intake
from mta.obs.log import event
from spool import SpoolError

log = logging.getLogger(__name__)

METADATA_ALLOWANCE = 1024 * 1024
# Longer than aiohttp's client keeps an idle connection (15 s), so a sender
# never reuses a connection this end is closing.
HEADER_TIMEOUT = 30.0
# The largest body (a message of max_message_size and its record) crosses a
# cluster network in seconds; this is a floor on the rate, not a target.
BODY_TIMEOUT = 120.0


class HandoffServer:
    def __init__(self, host: str, port: int, secret: bytes, intake: Intake, queued: Container[str],
                 max_message_size: int, stopping: Callable[[], bool], *, header_timeout: float = HEADER_TIMEOUT,
                 body_timeout: float = BODY_TIMEOUT) -> None:
        self.header_timeout, self.body_timeout = header_timeout, body_timeout
        self.host, self.port = host, port
        self.secret = secret
        self.intake = intake
        self.queued = queued  # the ids this pod holds
        self.max_body = max_message_size + METADATA_ALLOWANCE
        self.stopping = stopping
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application(client_max_size=self.max_body)
        app.router.add_post(wire.PATH, self._handoff)
        # aiohttp's keep-alive timeout runs from the connection's start and
        # from each response until a request header is complete.
        self.runner = web.AppRunner(app, access_log=None, keepalive_timeout=self.header_timeout)
        await self.runner.setup()
        await web.TCPSite(self.runner, self.host, self.port, reuse_address=True).start()
        log.info("handoff endpoint on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def _handoff(self, request: web.Request) -> web.Response:
        peer = request.remote or "?"
        if self.stopping():
            return web.json_response({"error": "shutting down"}, status=503)
        try:
            async with asyncio.timeout(self.body_timeout):
                body = await request.read()
        except TimeoutError:
            event("handoff_refused", level=logging.WARNING, client=peer, reason="body not received in time")
            # Closed after the answer: the rest of the body may still be on its way.
            return web.json_response({"error": "request body too slow"}, status=408, headers={"Connection": "close"})
        try:
            wire.verify(self.secret, body, request.headers.get(wire.TIMESTAMP), request.headers.get(wire.SIGNATURE))
        except wire.WireError as exc:
            event("handoff_refused", level=logging.WARNING, client=peer, reason=str(exc))
            return web.json_response({"error": "not authenticated"}, status=401)
        try:
            record, message = wire.decode(body)
        except wire.WireError as exc:
            event("handoff_refused", level=logging.WARNING, client=peer, reason=str(exc))
            return web.json_response({"error": str(exc)}, status=400)
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
