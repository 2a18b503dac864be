"""The HTTP side door: ``/healthz`` and ``/readyz`` for probes, ``/metrics``.

``/healthz`` answers while the event loop runs.  ``/readyz`` runs the
readiness checks it is given (each a name and a function returning
``(ok, detail)``) and answers 200 or 503 with a JSON body saying which
check fails.  Failure: a check that raises counts as failing, with the error
as its detail.  ``/metrics`` serves the Prometheus text format when a
``Metrics`` is given (404 otherwise).

A connection has ``REQUEST_TIMEOUT`` from its start, and again after each
response, to send a whole request header; one that has not is closed, so
half-sent requests cannot pile up open connections.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiohttp import web

from mta.obs.metrics import CONTENT_TYPE, Metrics

log = logging.getLogger(__name__)

Check = Callable[[], tuple[bool, str]]

# Probes and scrapers send their requests at once; anything slower is not one.
REQUEST_TIMEOUT = 10.0


class HealthServer:
    def __init__(self, host: str, port: int, checks: dict[str, Check], metrics: Metrics | None = None, *,
                 request_timeout: float = REQUEST_TIMEOUT) -> None:
        self.host, self.port = host, port
        self.request_timeout = request_timeout
        self.checks = checks
        self.metrics = metrics
        self.runner: web.AppRunner | None = None

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        if self.metrics is not None:
            app.router.add_get("/metrics", self._metrics)
        return app

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    def run_checks(self) -> dict[str, tuple[bool, str]]:
        results = {}
        for name, check in self.checks.items():
            try:
                ok, detail = check()
            except Exception as exc:  # noqa: BLE001 - a broken check means not ready
                ok, detail = False, f"check failed: {exc}"
            results[name] = (ok, detail)
        return results

    async def _readyz(self, request: web.Request) -> web.Response:
        results = self.run_checks()
        ready = all(ok for ok, _ in results.values())
        body = {"status": "ready" if ready else "not ready",
                "checks": {name: {"ok": ok, "detail": detail} for name, (ok, detail) in results.items()}}
        return web.json_response(body, status=200 if ready else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        assert self.metrics is not None
        # On the loop, like /readyz: the sources read live structures the loop changes.
        body = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def start(self) -> None:
        # aiohttp's keep-alive timeout runs from the connection's start and
        # from each response until a request header is complete: it is the
        # header timeout.  The handlers read no body.
        self.runner = web.AppRunner(self._app(), access_log=None, keepalive_timeout=self.request_timeout)
        await self.runner.setup()
        await web.TCPSite(self.runner, self.host, self.port, reuse_address=True).start()
        log.info("health endpoints on http://%s:%d/healthz and /readyz%s", self.host, self.port,
                 " and /metrics" if self.metrics is not None else "")

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
