"""The main process's side of the worker processes: start, feed, watch, restart, stop.

``Workers`` starts each worker (``python -P -m mta.cli worker``, so the working
directory is never on its path) with one end
of a socket pair, sends it the validated configuration, waits for
``ready``, then reads what it announces (``mta.workers.channel``): stored
records go to the scheduler, events to the logs, metrics and webhooks,
spool write timings to the histogram, reports to the gauges.

Failure: ``WorkerError`` when a worker cannot be started or does not get
ready in ``START_TIMEOUT``.  A worker that exits while the server runs is
logged (``worker_exited``) and started again after ``RESTART_DELAY``;
mail it stored but had not announced is found in the spool (``rescan``)
after it exits and every ``RESCAN`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Callable

from mta.config import Config
from mta.obs import log as obs_log
from mta.obs.log import event
from mta.scheduler.queue import Scheduler
from mta.workers import channel
from spool import Spool
from spool.record import RecordError, loads
from spool.store import HOLD, INCOMING

log = logging.getLogger(__name__)

RESCAN = 30.0  # seconds between looks for stored but unannounced messages
RESCAN_AGE = 10.0  # younger metadata files may still be on their way as announcements
RESTART_DELAY = 1.0
START_TIMEOUT = 30.0  # for a worker to load and bind its listeners


class WorkerError(Exception):
    pass


class Worker:
    def __init__(self, number: int) -> None:
        self.number = number
        self.process: asyncio.subprocess.Process | None = None
        self.listening = False
        self.sessions: dict[str, int] = {}  # as last reported
        self.handshakes: dict[str, int] = {}  # implicit-TLS handshakes under way, as last reported
        self.commits = (0, 0)  # spool (rounds, changes), as last reported
        self.commits_before = (0, 0)  # of its predecessors, so the counters never go back


class Workers:
    """Starts, feeds, watches and stops the worker processes of ``mta serve``."""

    def __init__(self, config: Config, spool: Spool, scheduler: Scheduler) -> None:
        self.config = config
        self.spool = spool
        self.scheduler = scheduler
        # The spool write histogram, for workers' spool writes (set by mta.obs.stack).
        self.observe_write: Callable[[str, float], None] | None = None
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
    def handshakes(self) -> dict[str, int]:
        """Implicit-TLS handshakes under way in the workers, by listener (for the handshakes gauge)."""
        total: dict[str, int] = {}
        for worker in self.workers:
            for name, count in worker.handshakes.items():
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
            try:
                # -P: the working directory stays off the worker's sys.path, or a data
                # directory named spool/ there would shadow the spool package.
                worker.process = await asyncio.create_subprocess_exec(
                    sys.executable, "-P", "-m", "mta.cli", "worker", "--channel-fd", str(theirs.fileno()),
                    pass_fds=(theirs.fileno(),), stdin=asyncio.subprocess.DEVNULL)
            except OSError as exc:
                raise WorkerError(f"worker {worker.number} cannot be started: {exc}") from None
            reader, writer = await asyncio.open_connection(sock=ours.dup(), limit=channel.LIMIT)
        writer.write(self.config.model_dump_json().encode() + b"\n")
        try:
            ready = channel.decode(await asyncio.wait_for(reader.readline(), START_TIMEOUT))
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
        worker.handshakes = {}
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
            message = channel.decode(line)
            kind = message["kind"]
            if kind == "record":
                record = loads(message["record"].encode())
                # A record the worker put on hold (a suppressed recipient, suppression.action hold) stays so.
                record.state = HOLD if record.attrs.get("held_recipients") else INCOMING
                self.scheduler.accept(record)
            elif kind == "event":
                obs_log.publish(message["name"], message["fields"])
            elif kind == "timing":
                if self.observe_write is not None:
                    self.observe_write(str(message["operation"]), float(message["seconds"]))
            elif kind == "report":
                worker.sessions = {str(k): int(v) for k, v in message["sessions"].items()}
                worker.handshakes = {str(k): int(v) for k, v in message.get("handshakes", {}).items()}
                worker.commits = (int(message["commits"][0]), int(message["commits"][1]))
        except (ValueError, KeyError, TypeError, RecordError) as exc:
            log.error("worker %d sent something unreadable (%s): %.200r", worker.number, exc, line)

    def rescan(self, min_age: float = RESCAN_AGE) -> int:
        """Queue stored messages nobody announced; returns how many were found."""
        if not self.scheduler.loaded.is_set():
            return 0  # the loader is still reading them: everything not yet tracked looks unannounced
        found = self.spool.unannounced(self.scheduler.records, min_age)
        for record in found:
            self.scheduler.accept(record)
        if found:
            event("spool_rescanned", level=logging.WARNING, found=len(found))
        return len(found)

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
