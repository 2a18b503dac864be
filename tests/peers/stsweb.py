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

import ssl

from aiohttp import web

from tests.peers.webthread import ThreadedWebApp


class StsWebServer(ThreadedWebApp):
    what = "MTA-STS web server"

    def __init__(self, tls: ssl.SSLContext, policies: dict[str, str] | None = None) -> None:
        super().__init__(tls)
        self.policies = dict(policies or {})
        self.redirect: set[str] = set()
        self.requests: list[str] = []
        self.posts: list[tuple[str, bytes]] = []

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

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/.well-known/mta-sts.txt", self._policy)
        app.router.add_post("/tlsrpt", self._report)
