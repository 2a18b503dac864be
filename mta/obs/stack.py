"""The observability parts of one ``mta serve``, built and wired together.

Owns the lifetime of the metrics registry, the disk guard and the webhook
sender, and what ``mta.app`` needs from them: the log set-up, readiness
checks for ``/readyz``, and the event subscriptions (the disk guard's
refusal of new mail is admission policy: ``mta.policy.admission``).
``mta.app`` calls ``setup_logging``, ``attach``, ``start`` and ``stop``;
nothing else here is its business.

Failure: ``start`` raises ``OSError`` when the webhook outbox cannot be
created; ``stop`` never raises and is safe to call when ``start`` was not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from mta.config import Config
from mta.obs import log as obs_log
from mta.obs.disk import DiskGuard
from mta.obs.http import HealthServer
from mta.obs.metrics import Metrics, QueueSnapshot
from mta.obs.webhooks import Webhooks

log = logging.getLogger(__name__)


class Observability:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics(config.metrics.domains, [item.name for item in config.listeners],
                               webhook_endpoints=[item.name for item in config.webhooks.endpoints],
                               sending_domains=[k.domain for k in config.dkim.keys] + config.identity.sending_domains,
                               esp_providers=config.feedback.esp.providers) \
            if config.metrics.enabled else None
        self.disk = DiskGuard(config.spool.path, config.disk)
        self.webhooks = Webhooks(config.webhooks, config.spool.path / "webhooks", config.hostname, self.metrics)
        self._subscribed: list[obs_log.Subscriber] = []

    def setup_logging(self) -> None:
        obs_log.setup(self.config.log.level, self.config.log.format)

    @property
    def checks(self) -> dict[str, Callable[[], tuple[bool, str]]]:
        """Readiness checks to add to ``/readyz``."""
        return {"disk": self.disk.ready}

    def attach(self, scheduler: Any, spool: Any, health: HealthServer, listeners: Callable[[], Iterable[Any]],
               workers: Any = None) -> None:
        """Point the scrape-time gauges at their owners and subscribe to events.

        ``workers`` (``mta.workers.Workers``) adds the worker processes'
        sessions, TLS handshakes, spool commits and spool write durations.
        """
        if self.metrics is not None:
            metrics = self.metrics

            def queue() -> QueueSnapshot:
                by_state, active, oldest = scheduler.snapshot()
                return QueueSnapshot(by_state, active, oldest)

            metrics.sources.queue = queue

            def sessions() -> dict[str, int]:
                counts = workers.sessions if workers is not None else {}
                for item in listeners():
                    counts[item.config.name] = counts.get(item.config.name, 0) + len(item.sessions)
                return counts

            metrics.sources.sessions = sessions

            def handshakes() -> dict[str, int]:
                counts = workers.handshakes if workers is not None else {}
                for item in listeners():
                    counts[item.config.name] = counts.get(item.config.name, 0) + item.front.slots.handshakes
                return counts

            metrics.sources.handshakes = handshakes
            metrics.sources.readiness = lambda: {name: ok for name, (ok, _) in health.run_checks().items()}
            metrics.sources.disk = self.disk.metrics

            def commits() -> tuple[int, int]:
                ours, theirs = spool.stats, workers.commits if workers is not None else (0, 0)
                return ours[0] + theirs[0], ours[1] + theirs[1]

            metrics.sources.spool_commits = commits
            spool.observe = metrics.observe_spool_write
            if workers is not None:
                workers.observe_write = metrics.observe_spool_write
            self._subscribe(metrics.on_event)
        if self.webhooks.endpoints:
            self._subscribe(self.webhooks.on_event)

    def _subscribe(self, subscriber: obs_log.Subscriber) -> None:
        obs_log.subscribe(subscriber)
        self._subscribed.append(subscriber)

    async def start(self) -> None:
        try:
            await self.webhooks.start()
        except OSError as exc:
            raise OSError(exc.errno, f"webhook outbox {self.webhooks.outbox}: {exc.strerror}") from None

    async def stop(self) -> None:
        try:
            await self.webhooks.stop(timeout=5.0)
        except Exception:  # shutdown goes on whatever happens here
            log.exception("webhooks did not stop cleanly")
        for subscriber in self._subscribed:
            obs_log.unsubscribe(subscriber)
        self._subscribed.clear()
