"""The body of ``mta worker``: receive on the shared listeners until told to stop.

A worker reads its configuration from the channel (``mta.workers.channel``),
attaches to the main process's spool shard, serves the listeners without
AUTH (``SO_REUSEPORT``) with the same session code and policy, and puts
mail through an intake whose announcements, like its events, spool write
timings and periodic reports, go over the channel.

Failure: a listener that cannot bind ends the worker before ``ready`` (the
main process reports it).  SIGTERM, or the end of the channel (the main
process is gone), stops accepting and lets running sessions finish until
``shutdown.timeout``; SIGINT is ignored, since the main process decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from typing import Any

from mta.config import Config
from mta.intake import Intake
from mta.obs import log as obs_log
from mta.obs.stack import Observability
from mta.policy.admission import storage
from mta.policy.suppressed import check_for
from mta.smtp.server import Listener
from mta.smtp.session import SessionHandler
from mta.suppression import open_list
from mta.workers import channel, shared
from spool import Record, Spool

REPORT_INTERVAL = 1.0  # how often a worker reports its open sessions and spool counters


class Announcer:
    """A worker's end of the channel: its intake announces stored mail here, and its events go here."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer

    def _send(self, kind: str, **fields: Any) -> None:
        if not self.writer.is_closing():
            self.writer.write(channel.encode(kind, **fields))

    def accept(self, record: Record) -> None:
        self._send("record", record=record.dumps().decode())

    def event(self, name: str, fields: dict[str, Any]) -> None:
        self._send("event", name=name, fields=fields)

    def timing(self, operation: str, seconds: float) -> None:
        self._send("timing", operation=operation, seconds=seconds)

    def report(self, listeners: list[Listener], spool: Spool) -> None:
        self._send("report", sessions={item.config.name: len(item.sessions) for item in listeners},
                   handshakes={item.config.name: item.front.slots.handshakes for item in listeners},
                   commits=list(spool.stats))


async def serve_worker(channel_fd: int) -> None:
    """The body of ``mta worker``: receive on the shared listeners until told to stop."""
    reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=channel_fd), limit=channel.LIMIT)
    config = Config.model_validate_json(await reader.readline())
    obs = Observability(config)
    obs.setup_logging()
    announcer = Announcer(writer)
    obs_log.subscribe(announcer.event)
    spool = Spool(config.spool_shard, config.spool.sync)
    spool.attach()
    spool.observe = announcer.timing
    intake = Intake(spool, announcer.accept, config.queue.lifetime)
    listeners: list[Listener] = []
    suppressions = open_list(config)
    try:
        for item in shared(config):
            handler = SessionHandler(item, config, intake, [storage(obs.disk.ready, item.name)],
                                     suppression=check_for(suppressions, item.name))
            listener = Listener(item, config, handler)
            await listener.start(reuse_port=True)
            listeners.append(listener)
        writer.write(channel.encode("ready", listeners=[item.config.name for item in listeners]))
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        # The main process says when to stop: Ctrl-C reaches the whole process
        # group, and a worker that left first would look like a crash.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        waits = {asyncio.create_task(stop.wait()), asyncio.create_task(reader.read())}  # EOF: the main process is gone
        while not stop.is_set():
            done, _ = await asyncio.wait(waits, timeout=REPORT_INTERVAL, return_when=asyncio.FIRST_COMPLETED)
            if done:
                break
            announcer.report(listeners, spool)
        for task in waits:
            task.cancel()
        deadline = loop.time() + config.shutdown.timeout
        for listener in listeners:
            listener.stop_accepting()
        await asyncio.gather(*(listener.drain(deadline) for listener in listeners))
    finally:
        if suppressions is not None:
            suppressions.close()
        spool.close()
        obs_log.unsubscribe(announcer.event)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()
