"""Delivery-event webhooks: signed JSON POSTs, durable, never in the way of mail.

Owns the webhook outbox, ``<spool.path>/webhooks/<endpoint>/``: one file per
event and endpoint, holding the exact JSON body to POST, named so that
sorting the names gives the order of the events.  ``on_event`` (a
``mta.obs.log`` subscriber) only appends to a bounded in-memory list and
wakes a writer task; the writer makes the files durable (``spool.safeio``:
write, fsync, rename, directory fsync, off the event loop, many events per
round); one sender task per endpoint POSTs its files in order and removes
each once the endpoint answered 2xx.

Each POST carries ``X-Kubemta-Timestamp`` (unix seconds, at sending) and
``X-Kubemta-Signature: sha256=HEX``, the HMAC-SHA256 with the endpoint's
secret over ``TIMESTAMP + "." + BODY``, plus ``X-Kubemta-Event`` and
``X-Kubemta-Event-Id`` (the same on every retry, for de-duplication).

Failure: a POST that fails (no connection, timeout, any answer but 2xx) is
counted and retried after a backoff (``retry_initial`` doubling to
``retry_max``, with jitter: the mail queue's ``retry_delay``) while later
events of that endpoint wait, so the order holds.  Events older than
``max_age`` are dropped and counted, as are new ones while an endpoint's
outbox holds ``max_outbox`` events or when the outbox cannot be written.
Delivery is at least once: an event whose POST succeeded just before a
crash is sent again after the restart; an event not yet written to the
outbox when the process dies is lost.

Stopping never waits on an endpoint: ``stop`` sets a stop event the senders
check after every wait, cancels them, and waits for them a bounded time.
No wait here uses ``asyncio.wait_for``, whose Python 3.11 version drops a
cancellation that arrives as the awaited thing completes (a sender woken by
the last events written at shutdown would then POST on, unstoppable).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from mta.config import WEBHOOK_EVENTS, WebhookEndpoint, WebhooksConfig
from mta.obs.metrics import Metrics
from mta.scheduler.backoff import retry_delay
from mta.sliding_window import SlidingWindow
from spool.safeio import TEMPORARY_SUFFIX, write_files

log = logging.getLogger(__name__)

MAX_PENDING = 100_000  # events waiting to be written to the outbox, all endpoints together
RESCAN = 30.0  # an idle sender looks at its outbox at least this often
OUTBOX_MODE = 0o640
RETRY_JITTER = 0.2  # ±20 %, so endpoints that failed together do not retry in lockstep
REJECTED_PER_MINUTE = 60  # per endpoint; past it, rejected events are dropped and counted (reason "rate")
MIN_RETRY_DELAY = 0.05  # retry_initial may be far below the mail queue's 1 s floor


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The ``X-Kubemta-Signature`` value for ``body`` sent at ``timestamp``."""
    digest = hmac.new(secret, timestamp.encode("ascii") + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify(secret: bytes, timestamp: str, body: bytes, signature: str) -> bool:
    """What a receiver does (also used by the tests)."""
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


@dataclass
class _Endpoint:
    config: WebhookEndpoint
    folder: Path
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    waiting: int = 0  # files in the outbox
    failures: int = 0  # consecutive failed POSTs
    rejected: SlidingWindow = field(default_factory=lambda: SlidingWindow(60.0, max_events=REJECTED_PER_MINUTE))

    def take_rejected(self, now: float) -> bool:
        """Whether one more ``rejected`` event fits this minute's budget (and counts it)."""
        if self.rejected.count(now) >= REJECTED_PER_MINUTE:
            return False
        self.rejected.add(now)
        return True


class Webhooks:
    def __init__(self, config: WebhooksConfig, outbox: Path, hostname: str, metrics: Metrics | None = None,
                 *, clock: Callable[[], float] = time.time, rng: random.Random | None = None) -> None:
        self.config = config
        self.outbox = Path(outbox)
        self.hostname = hostname
        self.metrics = metrics
        self.clock = clock
        self.rng = rng or random.Random()
        self.endpoints = [_Endpoint(item, self.outbox / item.name) for item in config.endpoints]
        self._pending: deque[tuple[str, dict[str, Any]]] = deque()
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._writer: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._seq = 0
        self._stopping = False  # no new events are taken
        self._stop = asyncio.Event()  # senders leave at their next wait

    # -- intake (any thread, never blocks) --------------------------------------

    def on_event(self, name: str, fields: dict[str, Any]) -> None:
        if name not in WEBHOOK_EVENTS or not self.endpoints or self._loop is None or self._stopping:
            return
        if len(self._pending) >= MAX_PENDING:
            self._drop_all("backlog_full")
            return
        self._pending.append((name, dict(fields)))
        if threading.get_ident() == self._loop_thread:
            self._wake.set()
        else:
            self._loop.call_soon_threadsafe(self._wake.set)

    def _drop_all(self, reason: str) -> None:
        if self.metrics is not None:
            for endpoint in self.endpoints:
                self.metrics.webhook_dropped.labels(endpoint.config.name, reason).inc()

    # -- lifetime ----------------------------------------------------------------

    async def start(self) -> None:
        if not self.endpoints:
            return
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        await asyncio.to_thread(self._prepare)
        self._session = aiohttp.ClientSession()
        self._writer = asyncio.create_task(self._write_loop())
        self._tasks = [asyncio.create_task(self._send_loop(endpoint)) for endpoint in self.endpoints]

    def _prepare(self) -> None:
        for endpoint in self.endpoints:
            endpoint.folder.mkdir(parents=True, exist_ok=True)
            # Half-written events of a crash: never renamed, so never announced.
            for leftover in endpoint.folder.glob(f"*{TEMPORARY_SUFFIX}"):
                leftover.unlink()
            endpoint.waiting = len(self._files(endpoint))
            self._gauge(endpoint)

    async def stop(self, timeout: float = 5.0) -> None:
        """Write what is pending to the outbox, then stop sending; returns within about ``2 * timeout``."""
        self._stopping = True
        if self._writer is not None:
            self._wake.set()
            # asyncio.wait, not wait_for: it neither cancels the writer
            # midway through a batch nor loses a cancellation of this call.
            await asyncio.wait({self._writer}, timeout=timeout)
            self._writer.cancel()
        self._stop.set()
        for endpoint in self.endpoints:
            endpoint.wake.set()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            _, stuck = await asyncio.wait(self._tasks, timeout=timeout)
            if stuck:
                log.warning("webhooks: %d sender(s) did not stop within %.1fs; left behind", len(stuck), timeout)
        if self._session is not None:
            await self._session.close()

    # -- the outbox ----------------------------------------------------------------

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch: list[tuple[_Endpoint, str, bytes]] = []
            added = dict.fromkeys(range(len(self.endpoints)), 0)
            while self._pending:
                name, fields = self._pending.popleft()
                body = self._body(name, fields)
                for index, endpoint in enumerate(self.endpoints):
                    if name not in endpoint.config.events:
                        continue
                    if name == "rejected" and not endpoint.take_rejected(time.monotonic()):
                        # Unauthenticated clients make these at will: they must not
                        # crowd the delivery events out of the outbox.
                        self._dropped(endpoint, "rate")
                        continue
                    if endpoint.waiting + added[index] >= self.config.max_outbox:
                        self._dropped(endpoint, "outbox_full")
                        continue
                    self._seq += 1
                    added[index] += 1
                    batch.append((endpoint, f"{time.time_ns():020d}-{self._seq:08d}.json", body))
            if batch:
                try:
                    await asyncio.to_thread(self._persist, batch)
                except OSError as exc:
                    log.error("webhook outbox %s cannot be written, %d event(s) dropped: %s",
                              self.outbox, len(batch), exc)
                    for endpoint, _, _ in batch:
                        self._dropped(endpoint, "write_failed")
                else:
                    for index, count in added.items():
                        if count:
                            endpoint = self.endpoints[index]
                            endpoint.waiting += count
                            self._gauge(endpoint)
                            endpoint.wake.set()
            if self._stopping and not self._pending:
                return

    def _body(self, name: str, fields: dict[str, Any]) -> bytes:
        payload: dict[str, Any] = {
            "id": uuid.uuid4().hex,
            "event": name,
            "time": datetime.fromtimestamp(self.clock(), UTC).isoformat(timespec="milliseconds"),
            "hostname": self.hostname,
        }
        for key, value in fields.items():
            if key not in payload:
                payload[key] = value if value is None or isinstance(value, bool | int | float | str) else str(value)
        return json.dumps(payload, separators=(",", ":")).encode()

    @staticmethod
    def _persist(batch: list[tuple[_Endpoint, str, bytes]]) -> None:
        # All or nothing: on failure no file of the batch is left for a sender.
        write_files([(endpoint.folder / name, body) for endpoint, name, body in batch], OUTBOX_MODE)

    @staticmethod
    def _files(endpoint: _Endpoint) -> list[Path]:
        return sorted(p for p in endpoint.folder.iterdir() if p.suffix == ".json")

    # -- sending ---------------------------------------------------------------------

    async def _send_loop(self, endpoint: _Endpoint) -> None:
        # Every wait is followed by a look at the stop event, so a sender
        # leaves even if its cancellation was lost on the way.
        while not self._stop.is_set():
            endpoint.wake.clear()
            files = await asyncio.to_thread(self._files, endpoint)
            endpoint.waiting = len(files)
            self._gauge(endpoint)
            for path in files:
                while not self._stop.is_set() and not await self._send_one(endpoint, path):
                    endpoint.failures += 1
                    await _wait(self._stop, self._backoff(endpoint.failures))
                if self._stop.is_set():
                    return
                endpoint.failures = 0
            if not files:
                await _wait(endpoint.wake, RESCAN)

    def _backoff(self, failures: int) -> float:
        return retry_delay(failures, self.config.retry_initial, self.config.retry_max, RETRY_JITTER, self.rng,
                           floor=MIN_RETRY_DELAY)

    async def _send_one(self, endpoint: _Endpoint, path: Path) -> bool:
        """POST one outbox file; True when it is done with (sent or dropped)."""
        try:
            body, secret = await asyncio.to_thread(self._read, endpoint, path)
        except FileNotFoundError:
            return True
        except OSError as exc:
            log.error("webhook %s: cannot read %s: %s", endpoint.config.name, path, exc)
            return False
        created = int(path.name.split("-", 1)[0]) / 1e9 if path.name.split("-", 1)[0].isdigit() else self.clock()
        if self.clock() - created > self.config.max_age:
            log.warning("webhook %s: event %s dropped after %.0fs undelivered", endpoint.config.name, path.name,
                        self.clock() - created)
            await self._done(endpoint, path)
            self._dropped(endpoint, "expired")
            return True
        timestamp = str(int(self.clock()))
        event_name, event_id = _peek(body)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "kubemta-webhooks",
            "X-Kubemta-Event": event_name,
            "X-Kubemta-Event-Id": event_id,
            "X-Kubemta-Timestamp": timestamp,
            "X-Kubemta-Signature": sign(secret, timestamp, body),
        }
        assert self._session is not None
        try:
            async with self._session.post(endpoint.config.url, data=body, headers=headers, allow_redirects=False,
                                          timeout=aiohttp.ClientTimeout(total=endpoint.config.timeout)) as response:
                await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self._failed(endpoint, f"{type(exc).__name__}: {exc}")
            return False
        if not 200 <= status < 300:
            self._failed(endpoint, f"HTTP {status}")
            return False
        await self._done(endpoint, path)
        if self.metrics is not None:
            self.metrics.webhook_deliveries.labels(endpoint.config.name).inc()
        return True

    @staticmethod
    def _read(endpoint: _Endpoint, path: Path) -> tuple[bytes, bytes]:
        body = path.read_bytes()
        lines = endpoint.config.secret_file.read_text().splitlines()
        return body, (lines[0].strip() if lines else "").encode()

    async def _done(self, endpoint: _Endpoint, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(path.unlink)
        endpoint.waiting = max(0, endpoint.waiting - 1)
        self._gauge(endpoint)

    def _failed(self, endpoint: _Endpoint, why: str) -> None:
        log.warning("webhook %s: POST to %s failed (%s); will retry", endpoint.config.name, endpoint.config.url, why)
        if self.metrics is not None:
            self.metrics.webhook_failures.labels(endpoint.config.name).inc()

    def _dropped(self, endpoint: _Endpoint, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.webhook_dropped.labels(endpoint.config.name, reason).inc()

    def _gauge(self, endpoint: _Endpoint) -> None:
        if self.metrics is not None:
            self.metrics.webhook_outbox.labels(endpoint.config.name).set(endpoint.waiting)


async def _wait(event: asyncio.Event, timeout: float) -> None:
    """Until ``event`` is set or ``timeout`` passed; a cancellation always propagates."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()


def _peek(body: bytes) -> tuple[str, str]:
    try:
        payload = json.loads(body)
        return str(payload.get("event", "")), str(payload.get("id", ""))
    except (ValueError, AttributeError):
        return "", ""
