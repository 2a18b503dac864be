"""Worker processes: more SMTP receivers on the same ports and the same spool.

One Python process runs on one core.  With ``workers: N`` (N > 0), ``mta
serve`` starts N worker processes.  Each one binds the listeners that offer
no AUTH with ``SO_REUSEPORT``, so the kernel spreads new connections over
them; receives mail with the same session code and policy; stores it
durably in the main process's spool shard (queue ids are unique, and a
worker only ever adds new messages, see ``Spool.attach``); and only then
announces the stored record, and every mail event, to the main process over
a socket pair, one JSON line each.

The main process does everything else for all mail: scheduling and delivery,
the AUTH listeners (so that brute-force throttling and account limits count
every attempt in one place), health and metrics (worker events feed the
same counters and webhooks; their sessions, spool commits and store
durations are added to the gauges, counters and histogram), the control socket, the drain and the identity checks.

Failure: a worker that cannot start its listeners stops ``mta serve`` from
starting (``WorkerError``).  A worker that exits while the server runs is logged
(``worker_exited``) and started again after a second.  A message a worker
stored but could not announce before it died is on disk all the same: the
main process looks for such messages in ``incoming/`` after a worker exits
and every ``RESCAN`` seconds.  When the main process goes away, the workers
see the end of the channel and stop: they never run on their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from mta.config import Config, ListenerConfig
from mta.intake import Intake
from mta.obs import log as obs_log
from mta.obs.log import event
from mta.obs.stack import Observability
from mta.policy.admission import storage
from mta.scheduler.queue import Scheduler
from mta.smtp.server import Listener
from mta.smtp.session import SessionHandler
from spool import Record, Spool
from spool.record import RecordError, loads
from spool.store import INCOMING

log = logging.getLogger(__name__)

RESCAN = 30.0  # seconds between looks for stored but unannounced messages
RESCAN_AGE = 10.0  # younger metadata files may still be on their way as announcements
RESTART_DELAY = 1.0
START_TIMEOUT = 30.0  # for a worker to load and bind its listeners
REPORT_INTERVAL = 1.0  # how often a worker reports its open sessions and spool counters
CHANNEL_LIMIT = 1 << 24  # longest line on the channel (the config, a record)


def shared(config: Config) -> list[ListenerConfig]:
    """The listeners every worker serves: those without AUTH."""
    return [item for item in config.listeners if item.auth is None]


def _line(kind: str, **fields: Any) -> bytes:
    return json.dumps({"kind": kind, **fields}, default=str, separators=(",", ":")).encode() + b"\n"


# -- the main process's side ---------------------------------------------------


class WorkerError(Exception):
    pass


class Worker:
    def __init__(self, number: int) -> None:
        self.number = number
        self.process: asyncio.subprocess.Process | None = None
        self.listening = False
        self.sessions: dict[str, int] = {}  # as last reported
        self.commits = (0, 0)  # spool (rounds, changes), as last reported
        self.commits_before = (0, 0)  # of its predecessors, so the counters never go back


class Workers:
    """Starts, feeds, watches and stops the worker processes of ``mta serve``."""

    def __init__(self, config: Config, spool: Spool, scheduler: Scheduler) -> None:
        self.config = config
        self.spool = spool
        self.scheduler = scheduler
        # The spool write histogram, for workers' stores (set by mta.obs.stack).
        self.observe_store: Callable[[float], None] | None = None
        self.workers = [Worker(number) for number in range(1, config.workers + 1)]
        self.stopping = False
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def sessions(self) -> dict[str, int]:
        """Open sessions in the workers, by listener (for the sessions gauge)."""
        total: dict[str, int] = {}
        for worker in self.workers:
            for name, count in worker.sessions.items():
                total[name] = total.get(name, 0) + count
        return total

    @property
    def commits(self) -> tuple[int, int]:
        """Spool commit rounds and changes of all workers, past and present."""
        rounds = sum(w.commits[0] + w.commits_before[0] for w in self.workers)
        changes = sum(w.commits[1] + w.commits_before[1] for w in self.workers)
        return rounds, changes

    def ready(self) -> tuple[bool, str]:
        """For ``/readyz``: every worker is listening (one being restarted is not)."""
        if not self.workers:
            return True, "none configured"
        down = [str(w.number) for w in self.workers if not w.listening]
        return (not down, f"not running: {', '.join(down)}" if down else f"{len(self.workers)} running")

    async def start(self) -> None:
        for worker in self.workers:
            await self._spawn(worker)
        if self.workers:
            self._tasks.append(asyncio.create_task(self._rescan_every(RESCAN)))

    async def _spawn(self, worker: Worker) -> None:
        ours, theirs = socket.socketpair()
        with ours, theirs:
            python = [sys.executable, "-P"] if sys.flags.safe_path else [sys.executable]
            try:
                worker.process = await asyncio.create_subprocess_exec(
                    *python, "-m", "mta.cli", "worker", "--channel-fd", str(theirs.fileno()),
                    pass_fds=(theirs.fileno(),), stdin=asyncio.subprocess.DEVNULL)
            except OSError as exc:
                raise WorkerError(f"worker {worker.number} cannot be started: {exc}") from None
            reader, writer = await asyncio.open_connection(sock=ours.dup(), limit=CHANNEL_LIMIT)
        writer.write(self.config.model_dump_json().encode() + b"\n")
        try:
            ready = json.loads(await asyncio.wait_for(reader.readline(), START_TIMEOUT) or b"{}")
        except (TimeoutError, ValueError, ConnectionError):
            ready = {}
        if ready.get("kind") != "ready":
            writer.close()
            with contextlib.suppress(ProcessLookupError):
                worker.process.kill()
            status = await worker.process.wait()
            raise WorkerError(f"worker {worker.number} did not start (exit status {status}); its log says why")
        worker.listening = True
        event("worker_started", worker=worker.number, worker_pid=worker.process.pid,
              listeners=",".join(ready["listeners"]))
        self._tasks = [task for task in self._tasks if not task.done()]
        self._tasks.append(asyncio.create_task(self._serve(worker, reader, writer)))

    async def _serve(self, worker: Worker, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                self._receive(worker, line)
        except (ConnectionError, ValueError) as exc:  # ValueError: a line over the limit
            log.error("worker %d channel failed: %s", worker.number, exc)
        finally:
            writer.close()
        assert worker.process is not None
        worker.listening = False
        status = await worker.process.wait()
        worker.sessions = {}
        worker.commits_before = (worker.commits_before[0] + worker.commits[0],
                                 worker.commits_before[1] + worker.commits[1])
        worker.commits = (0, 0)
        self.rescan(min_age=0.0)  # whatever it stored, it announced or it is on disk
        if self.stopping:
            return
        event("worker_exited", level=logging.ERROR, worker=worker.number, worker_pid=worker.process.pid,
              status=status)
        while not self.stopping:
            await asyncio.sleep(RESTART_DELAY)
            try:
                await self._spawn(worker)
                return
            except WorkerError as exc:
                log.error("%s", exc)

    def _receive(self, worker: Worker, line: bytes) -> None:
        try:
            message = json.loads(line)
            kind = message["kind"]
            if kind == "record":
                record = loads(message["record"].encode())
                record.state = INCOMING
                self.scheduler.accept(record)
                if self.observe_store is not None and message.get("seconds") is not None:
                    self.observe_store(float(message["seconds"]))
            elif kind == "event":
                obs_log.publish(message["name"], message["fields"])
            elif kind == "report":
                worker.sessions = {str(k): int(v) for k, v in message["sessions"].items()}
                worker.commits = (int(message["commits"][0]), int(message["commits"][1]))
        except (ValueError, KeyError, TypeError, RecordError) as exc:
            log.error("worker %d sent something unreadable (%s): %.200r", worker.number, exc, line)

    def rescan(self, min_age: float = RESCAN_AGE) -> int:
        """Queue stored messages nobody announced; returns how many were found."""
        found = 0
        limit = time.time() - min_age
        try:
            entries = list(os.scandir(self.spool.root / INCOMING))
        except OSError as exc:
            log.error("cannot scan the spool for unannounced mail: %s", exc)
            return 0
        for entry in entries:
            record_id = entry.name.removesuffix(".json")
            if record_id in self.scheduler.records:
                continue
            try:
                if entry.stat().st_mtime > limit:
                    continue
                record = self.spool.read_record(INCOMING, record_id)
            except FileNotFoundError:
                continue  # delivered and removed meanwhile
            except (OSError, RecordError) as exc:
                log.error("queue_id=%s unreadable in the spool: %s", record_id, exc)
                continue
            self.scheduler.accept(record)
            found += 1
        if found:
            event("spool_rescanned", level=logging.WARNING, found=found)
        return found

    async def _rescan_every(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.rescan()

    async def stop(self, deadline: float) -> None:
        """Ask every worker to finish its sessions by ``deadline`` (loop time), then make sure."""
        self.stopping = True
        running = [w.process for w in self.workers if w.process is not None and w.process.returncode is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        # The workers need the deadline for their sessions, and a moment to exit.
        grace = max(0.0, deadline - loop.time()) + 5.0
        waits = [asyncio.create_task(process.wait()) for process in running]
        if waits:
            _, late = await asyncio.wait(waits, timeout=grace)
            for process in running:
                if process.returncode is None:
                    log.error("worker pid %d did not stop in time; killing it", process.pid)
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
            if late:
                await asyncio.wait(late, timeout=5.0)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self.workers:
            self.rescan(min_age=0.0)


# -- a worker's side -------------------------------------------------------------


class Announcer:
    """A worker's end of the channel: its intake announces stored mail here, and its events go here."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self._seconds: dict[str, float] = {}

    def time_stores(self, spool: Spool) -> None:
        """Measure each store until durable, for the main process's spool write histogram."""
        original = spool.store

        async def store(data: bytes, record: Record) -> Record:
            started = time.perf_counter()
            stored = await original(data, record)
            self._seconds[stored.id] = time.perf_counter() - started
            return stored

        spool.store = store  # type: ignore[method-assign]

    def accept(self, record: Record) -> None:
        self.writer.write(_line("record", record=record.dumps().decode(), seconds=self._seconds.pop(record.id, None)))

    def event(self, name: str, fields: dict[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(_line("event", name=name, fields=fields))

    def report(self, listeners: list[Listener], spool: Spool) -> None:
        self.writer.write(_line("report", sessions={item.config.name: len(item.sessions) for item in listeners},
                                commits=list(spool.stats)))


async def serve_worker(channel_fd: int) -> None:
    """The body of ``mta worker``: receive on the shared listeners until told to stop."""
    reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=channel_fd), limit=CHANNEL_LIMIT)
    config = Config.model_validate_json(await reader.readline())
    obs = Observability(config)
    obs.setup_logging()
    announcer = Announcer(writer)
    obs_log.subscribe(announcer.event)
    spool = Spool(config.spool_shard, config.spool.sync)
    spool.attach()
    announcer.time_stores(spool)
    intake = Intake(spool, announcer.accept, config.queue.lifetime)
    listeners: list[Listener] = []
    try:
        for item in shared(config):
            handler = SessionHandler(item, config, intake, [storage(obs.disk.ready, item.name)])
            listener = Listener(item, config, handler)
            await listener.start(reuse_port=True)
            listeners.append(listener)
        writer.write(_line("ready", listeners=[item.config.name for item in listeners]))
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
        spool.close()
        obs_log.unsubscribe(announcer.event)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()
