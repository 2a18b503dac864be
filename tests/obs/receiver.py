"""A real HTTP webhook receiver on loopback, run in a thread, that checks signatures.

Owns one ``ThreadingHTTPServer`` on a fixed port that can be stopped and
started again (to play an endpoint that is down), and the list of what it
received.  Every POST is verified with ``mta.obs.webhooks.verify``; a bad or
stale signature is answered 401 and recorded as such.
How it fails: ``wait_for`` raises TimeoutError listing what arrived.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from mta.obs.webhooks import verify


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    valid: bool

    @property
    def payload(self) -> dict[str, Any]:
        return json.loads(self.body)


class Receiver:
    def __init__(self, port: int, secret: bytes) -> None:
        self.port = port
        self.secret = secret
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                timestamp = self.headers.get("X-Kubemta-Timestamp", "")
                fresh = timestamp.isdigit() and abs(time.time() - int(timestamp)) < 300
                valid = fresh and verify(receiver.secret, timestamp, body,
                                         self.headers.get("X-Kubemta-Signature", ""))
                with receiver._lock:
                    receiver.received.append(Received(self.path, dict(self.headers.items()), body, valid))
                self.send_response(204 if valid else 401)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def events(self, path: str | None = None) -> list[Received]:
        with self._lock:
            return [r for r in self.received if path is None or r.path == path]

    def wait_for(self, count: int, path: str | None = None, timeout: float = 20.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.events(path)
            if len(found) >= count:
                return found
            time.sleep(0.1)
        raise TimeoutError(f"{count} webhook POST(s) to {path} not received in {timeout}s: "
                           f"{[r.payload for r in self.events()]}")
