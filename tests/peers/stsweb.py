"""An HTTPS server of the tests' own that serves MTA-STS policies (aiohttp, trustme certificate).

Owns: one aiohttp application on 127.0.0.1 and a free port, run in a thread
with its own event loop.  ``policies`` maps a host name
(``mta-sts.<domain>``) to the policy text served at
``/.well-known/mta-sts.txt`` for requests naming it; ``redirect`` hosts
answer 301 instead, and ``requests`` lists the hosts asked for.  A POST to
``/tlsrpt`` (a TLS-RPT ``https`` rua) is kept in ``posts`` as (content type,
body) and answered 201.  The
certificate comes from the caller (a trustme CA), so tests choose the names
it is good for.

How it fails: ``start`` raises RuntimeError when the server does not come
up within 10 seconds; ``stop`` waits at most 10 seconds for the thread.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from types import TracebackType

from aiohttp import web

from tests.peers.net import free_port


class StsWebServer:
    def __init__(self, tls: ssl.SSLContext, policies: dict[str, str] | None = None) -> None:
        self.host = "127.0.0.1"
        self.port = free_port()
        self.tls = tls
        self.policies = dict(policies or {})
        self.redirect: set[str] = set()
        self.requests: list[str] = []
        self.posts: list[tuple[str, bytes]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None

    async def _policy(self, request: web.Request) -> web.StreamResponse:
        host = request.host.rsplit(":", 1)[0].lower()
        self.requests.append(host)
        if host in self.redirect:
            raise web.HTTPMovedPermanently(f"https://elsewhere.example/{host}")
        text = self.policies.get(host)
        if text is None:
            raise web.HTTPNotFound()
        return web.Response(text=text, content_type="text/plain")

    async def _report(self, request: web.Request) -> web.StreamResponse:
        self.posts.append((request.headers.get("Content-Type", ""), await request.read()))
        return web.Response(status=201)

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_get("/.well-known/mta-sts.txt", self._policy)
        app.router.add_post("/tlsrpt", self._report)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, ssl_context=self.tls)
        await site.start()
        self._stop = asyncio.Event()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()

    def start(self) -> StsWebServer:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._serve(),), daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"MTA-STS web server on {self.host}:{self.port} did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)
            self._loop.close()
            self._loop = None

    def __enter__(self) -> StsWebServer:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
