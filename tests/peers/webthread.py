"""An aiohttp application of the tests' own, served from a thread with its own event loop.

Owns: one site on ``host`` and a free port (HTTPS with the caller's
certificate, or plain HTTP), its thread and loop.  Subclasses add their
routes in ``routes``.

How it fails: ``start`` raises RuntimeError when the server does not come
up within 10 seconds; ``stop`` waits at most 10 seconds for the thread.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from types import TracebackType
from typing import Self

from aiohttp import web

from tests.peers.net import free_port


class ThreadedWebApp:
    what = "web server"  # for the start-up error

    def __init__(self, tls: ssl.SSLContext | None, host: str = "127.0.0.1") -> None:
        self.host, self.port, self.tls = host, free_port(host), tls
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def _serve(self) -> None:
        app = web.Application()
        self.routes(app)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, self.host, self.port, ssl_context=self.tls).start()
        self._stop = asyncio.Event()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()

    def start(self) -> Self:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._serve(),), daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"{self.what} on {self.host}:{self.port} did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)
            self._loop.close()
            self._loop = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
