"""kubemta's SMTP front end in the test process, for tests whose subject is the session.

``SessionServer`` builds the listeners exactly as ``mta serve`` does
(``SessionHandler`` + ``Listener`` from a validated ``Config``, the real
spool and intake, AUTH services, the disk admission check) and runs them on
an event loop in a thread of its own, as aiosmtpd's ``Controller`` does.
Clients are real (smtplib, raw sockets) over loopback; what differs from
``mta serve`` is what the session does not decide: nothing is scheduled or
delivered, and accepted mail is listed from the intake's announcements and
the spool itself.  Tests of what crosses a process boundary — delivery,
restarts, signals, the CLI — keep using ``tests.harness.MtaServer``.

It saves the child process's start (imports, config load, readiness poll)
and the DNS server and receivers a session test does not use.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

from mta.auth.credentials import Credentials, set_password
from mta.config import Config
from mta.intake import Intake
from mta.policy.admission import storage
from mta.smtp.server import Listener
from mta.smtp.session import AuthServices, SessionHandler
from spool import Record, Spool
from tests.harness import HOST, server_config
from tests.peers.net import free_port

START_TIMEOUT = 20.0


class SessionServer:
    def __init__(self, workdir: Path, config: dict[str, Any] | None = None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port(HOST)
        self.raw = server_config(workdir, self.port, free_port(HOST), config or {})
        self.config = Config.model_validate(self.raw)
        self.accepted: list[Record] = []
        self.listeners: list[Listener] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None
        self._spool: Spool | None = None
        self._failure: list[Exception] = []

    def add_user(self, listener: str, name: str, password: str) -> None:
        """A user in ``listener``'s credentials file, hashed as ``mta user add`` hashes it."""
        item = next(item for item in self.config.listeners if item.name == listener)
        assert item.auth is not None, f"listener {listener} has no auth"
        set_password(item.auth.credentials_file, name, password, create=True)

    def start(self) -> None:
        started = threading.Event()
        failure = self._failure

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._serve(started))
            except Exception as exc:  # noqa: BLE001 -- raised again by start() or stop(), in the test's thread
                failure.append(exc)
                started.set()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="session-server", daemon=True)
        self._thread.start()
        if not started.wait(START_TIMEOUT):
            raise RuntimeError("the in-process listeners did not start in time")
        if failure:
            raise RuntimeError(f"the in-process listeners failed to start: {failure[0]!r}") from failure[0]

    async def _serve(self, started: threading.Event) -> None:
        config = self.config
        self._stopped = asyncio.Event()
        spool = self._spool = Spool(config.spool_shard, config.spool.sync)
        spool.open()
        intake = Intake(spool, self.accepted.append, config.queue.lifetime)
        services = AuthServices.build(config.limits)
        try:
            for item in config.listeners:
                path = item.auth.credentials_file if item.auth else None
                credentials = Credentials(path) if path else None
                handler = SessionHandler(item, config, intake, [storage(lambda: (True, "spool has room"), item.name)],
                                         credentials=credentials, services=services)
                listener = Listener(item, config, handler)
                await listener.start()
                self.listeners.append(listener)
            started.set()
            await self._stopped.wait()
        finally:
            for listener in self.listeners:
                listener.stop_accepting()
            for listener in self.listeners:
                await listener.drain(asyncio.get_running_loop().time() + 2.0)
            services.gate.close()
            spool.close()

    @property
    def spool_dir(self) -> Path:
        return self.config.spool_shard

    def queued(self) -> list[Record]:
        """What the spool holds now (read from disk: a stored message, not only an announced one)."""
        assert self._spool is not None
        return [record for record in self.accepted if self._spool.message_path(record.id).exists()]

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Until no session is open: each has seen its client go and finished what it was doing."""
        deadline = time.monotonic() + timeout
        while any(listener.sessions for listener in self.listeners):
            assert time.monotonic() < deadline, "sessions still open"
            time.sleep(0.02)

    def stop(self) -> None:
        if self._loop is None or self._thread is None or self._stopped is None:
            return
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(START_TIMEOUT)
        assert not self._thread.is_alive(), "the in-process listeners did not stop"
        if self._failure:
            raise RuntimeError(f"the in-process listeners failed: {self._failure[0]!r}") from self._failure[0]
