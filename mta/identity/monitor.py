"""Runs the self-checks in ``mta serve``: at start and every ``check_interval``.

Each result is logged as a ``self_check`` event.  With ``identity.enforce``
a failing check makes ``/readyz`` fail and pauses delivery (mail stays
queued) until a later run passes, so mail never leaves from an identity
that receivers would distrust.  A change between failing and passing is
also recorded as a Kubernetes Event on the pod when the API is set up.
Failure: a run that raises is logged and counts as not known; the loop
goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from mta.config import Config
from mta.dkim.keys import SigningKey
from mta.identity.checks import CheckResult, SelfChecks, failing
from mta.obs.log import event
from mta.scheduler.queue import Scheduler

log = logging.getLogger(__name__)


class IdentityMonitor:
    def __init__(self, config: Config, keys: list[SigningKey], scheduler: Scheduler,
                 notify: Callable[[str, str, str], None] | None = None) -> None:
        self.config = config
        self.checks = SelfChecks(config, keys)
        self.scheduler = scheduler
        # (reason, message, kind) -> a Kubernetes Event on the pod; blocking, run in a thread
        self.notify = notify
        self.results: list[CheckResult] | None = None
        self._task: asyncio.Task[None] | None = None

    async def run_once(self) -> list[CheckResult]:
        results = await self.checks.run()
        for result in results:
            level = logging.WARNING if result.status != "pass" else logging.INFO
            event("self_check", level=level, check=result.name, status=result.status, reason=result.reason)
        was_failing = bool(failing(self.results)) if self.results is not None else False
        self.results = results
        bad = failing(results)
        if self.notify is not None and bool(bad) != was_failing:
            summary = "; ".join(f"{r.name}: {r.reason}" for r in bad) if bad else "all self-checks pass"
            reason, kind = ("SelfCheckFailed", "Warning") if bad else ("SelfCheckPassed", "Normal")
            await asyncio.to_thread(self.notify, reason, summary[:1000], kind)
        if self.config.identity.enforce:
            self.scheduler.pause("; ".join(f"{r.name}: {r.reason}" for r in bad) if bad else None)
        return results

    def ready(self) -> tuple[bool, str]:
        if not self.config.identity.enforce:
            return True, "not enforced"
        if self.results is None:
            return False, "self-checks have not run yet"
        bad = failing(self.results)
        return (not bad, "; ".join(f"{r.name}: {r.reason}" for r in bad) if bad else "all checks pass")

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception:
                log.exception("self-check run failed")
            await asyncio.sleep(self.config.identity.check_interval)

    def start(self) -> None:
        if self.config.identity.enforce:
            self.scheduler.pause("self-checks have not run yet")
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
