"""The HTTP side door: ``/healthz`` and ``/readyz`` for probes.

``/healthz`` answers while the event loop runs.  ``/readyz`` runs the
readiness checks it is given (each a name and a function returning
``(ok, detail)``) and answers 200 or 503 with a JSON body saying which
check fails.  Failure: a check that raises counts as failing, with the error
as its detail.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiohttp import web

log = logging.getLogger(__name__)

Check = Callable[[], tuple[bool, str]]


class HealthServer:
    def __init__(self, host: str, port: int, checks: dict[str, Check]) -> None:
        self.host, self.port = host, port
        self.checks = checks
        self.runner: web.AppRunner | None = None

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        return app

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        results = {}
        ready = True
        for name, check in self.checks.items():
            try:
                ok, detail = check()
            except Exception as exc:  # noqa: BLE001 - a broken check means not ready
                ok, detail = False, f"check failed: {exc}"
            results[name] = {"ok": ok, "detail": detail}
            ready = ready and ok
        body = {"status": "ready" if ready else "not ready", "checks": results}
        return web.json_response(body, status=200 if ready else 503)

    async def start(self) -> None:
        self.runner = web.AppRunner(self._app(), access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, self.host, self.port, reuse_address=True).start()
        log.info("health endpoints on http://%s:%d/healthz and /readyz", self.host, self.port)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
