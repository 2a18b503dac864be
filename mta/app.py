"""Wiring and lifetime of ``mta serve``: build the parts, run, shut down.

Start: open (and lock) the spool and load it, then start the scheduler, the
listeners, the control socket, the health endpoints and the worker
processes, if ``workers`` asks for them (``mta.workers``).  SIGTERM or SIGINT:
readiness turns false at once, listeners stop accepting, sessions in a
transaction may finish until ``shutdown.timeout``, deliveries in flight get
the same deadline and are then abandoned (their mail stays queued), and the
spool is closed.  Nothing that was answered 250 depends on a clean shutdown:
it is on disk before the reply.

Failure: ``StartupError`` with a message naming what could not start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sqlite3
import time

from mta import workload_identity
from mta.api import esp_events
from mta.api.esp_events import EspEvents
from mta.api.idempotency import IdempotencyStore
from mta.api.keys import ApiKeys
from mta.api.server import ApiServer
from mta.auth.credentials import Credentials, CredentialsError
from mta.config import Config
from mta.control import ControlServer, socket_path
from mta.delivery.client import Connector, client_settings
from mta.delivery.courier import Courier
from mta.delivery.mx import MxResolver, make_resolver
from mta.delivery.tlspolicy import TlsPolicy
from mta.delivery.tlspolicy import build as build_tls_policy
from mta.dkim.keys import DkimKeyError, SigningKey
from mta.dkim.signer import Signer
from mta.drain.service import DrainError, DrainService
from mta.feedback import receiver as feedback_receiver
from mta.feedback.actions import FeedbackActions
from mta.identity.monitor import IdentityMonitor
from mta.intake import Intake
from mta.k8s.api import KubeError, try_event
from mta.k8s.pods import PodDirectory
from mta.limits.fallback import open_store
from mta.obs.http import HealthServer
from mta.obs.log import event
from mta.obs.stack import Observability
from mta.policy.admission import storage
from mta.policy.suppressed import check_for
from mta.policy.workloads import WorkloadIdentity
from mta.scheduler.operator import Operator
from mta.scheduler.queue import Scheduler, assemble
from mta.secret_files import readable_by_others
from mta.smtp.server import Listener
from mta.smtp.session import AuthServices, SessionHandler
from mta.smtp.tls import ServerTls, TlsError
from mta.suppression import SuppressionError, open_list
from mta.tlsrpt.record import SessionRecord
from mta.tlsrpt.send import build as build_reporter
from mta.tlsrpt.send import record_path
from mta.workers import shared
from mta.workers.supervisor import WorkerError, Workers
from spool import Spool, SpoolError

log = logging.getLogger(__name__)


class StartupError(Exception):
    pass


class App:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.spool = Spool(config.spool_shard, config.spool.sync)
        self.listeners: list[Listener] = []
        self.stopping = False
        self.obs = Observability(config)  # metrics, JSON logs, disk guard, webhooks
        self.drain = DrainService(config, self.spool)  # handoff endpoint and scale-down drain
        self.tls_policy: TlsPolicy | None = None  # outbound TLS for direct delivery, built with the connector
        self.api: ApiServer | None = None
        self.esp_events: EspEvents | None = None
        self.tls_reports: SessionRecord | None = None  # TLS-RPT counts (tls_reports.enabled)
        self.idempotency: IdempotencyStore | None = None
        self.workloads: WorkloadIdentity | None = None  # service_accounts / identify_pods
        self.pods: PodDirectory | None = None

    def _connector(self) -> Connector:
        config = self.config
        resolver = make_resolver(config.dns.servers, config.dns.timeout)
        settings = client_settings(config)
        self.tls_policy = build_tls_policy(config, resolver)
        if config.tls_reports.enabled:
            try:
                self.tls_reports = SessionRecord(record_path(config.spool.path))
            except (sqlite3.Error, OSError) as exc:
                raise StartupError(f"tls_reports: cannot open {record_path(config.spool.path)}: {exc}") from None
        return Connector(settings, MxResolver(resolver), self.tls_policy, config.delivery.tls_ca_file,
                         reports=self.tls_reports)

    # -- readiness ---------------------------------------------------------

    def _listeners_ready(self) -> tuple[bool, str]:
        if self.stopping:
            return False, "shutting down"
        down = [item.config.name for item in self.listeners if not item.serving]
        return (not down, f"not serving: {', '.join(down)}" if down else "all serving")

    def _spool_ready(self) -> tuple[bool, str]:
        probe = self.config.spool_shard / "tmp" / f"readyz.{os.getpid()}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, b"ok")
                os.fsync(fd)
            finally:
                os.close(fd)
            probe.unlink()
        except OSError as exc:
            return False, f"cannot write to the spool: {exc.strerror}"
        return True, "writable"

    # -- lifetime ------------------------------------------------------------

    async def run(self) -> None:
        config = self.config
        self.obs.setup_logging()
        for key, path, mode in readable_by_others(config):
            event("secret_file_readable", level=logging.WARNING, key=key, path=str(path), mode=f"{mode:04o}",
                  reason="group or others can read it; make it 0400 or 0600 (a Secret's defaultMode)")
        try:
            self.drain.setup()
        except DrainError as exc:
            raise StartupError(str(exc)) from None
        try:
            keys = [SigningKey.load(k.domain, k.selector, k.key_file) for k in config.dkim.keys]
            signer = Signer(keys, config.dkim.fallback_domain)
        except DkimKeyError as exc:
            raise StartupError(f"dkim.keys: {exc}") from None
        try:
            # Earlier mail is loaded once the listeners take new mail (_load_queue).
            cutoff = self.spool.take()
        except SpoolError as exc:
            raise StartupError(str(exc)) from None
        except OSError as exc:
            raise StartupError(f"spool.path {config.spool.path}: {exc.strerror}") from None
        try:
            suppressions = open_list(config)
        except SuppressionError as exc:
            raise StartupError(f"suppression.path: {exc}") from None
        # Reports to the feedback listener and providers' event webhooks act alike (mta.feedback.actions).
        actions = FeedbackActions(config.bounces.classifier(), suppressions, config.suppression.scope)
        try:
            return_paths, feedback = feedback_receiver.build(config, actions)
        except OSError as exc:
            raise StartupError(f"feedback.secret_file: {exc.strerror or exc}") from None
        try:
            self.esp_events = esp_events.build(config, actions)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        except OSError as exc:
            raise StartupError(f"feedback.esp: {exc.filename}: {exc.strerror or exc}") from None
        courier = Courier(self._connector().open, self.spool.message, signer,
                          return_paths.sender if return_paths is not None else None)
        limits = open_store(config.limits.store, await self._replicas())
        scheduler, intake = assemble(self.spool, config, courier, limits=limits)
        scheduler.suppressions = suppressions
        intake.wait_for_load(cutoff, scheduler.loaded)
        reporter = build_reporter(config, self.tls_reports, intake) if self.tls_reports is not None else None
        api = self.drain.api
        identity = IdentityMonitor(config, keys, scheduler,
                                   notify=(lambda reason, message, kind: try_event(api, reason, message, kind))
                                   if api is not None else None)
        host, port = config.http.host_port
        workers = Workers(config, self.spool, scheduler)
        health = HealthServer(host, port, {"listeners": self._listeners_ready, "spool": self._spool_ready,
                                           "identity": identity.ready, "workers": workers.ready,
                                           **self.obs.checks},
                              metrics=self.obs.metrics)
        self.obs.attach(scheduler, self.spool, health, lambda: self.listeners, workers)
        scheduler_task: asyncio.Task[None] | None = None
        # With workers, they serve the listeners without AUTH; this process delivers.
        delegated = {item.name for item in shared(config)} if config.workers else set()
        # One gate for every AUTH listener and the HTTP API; the control socket clears its lockouts.
        services = AuthServices.build(config.limits, limits)
        self.workloads, self.pods = workload_identity.build(config, self.drain.api)
        control = ControlServer(socket_path(config.spool.path), Operator(scheduler), services.gate, reporter)
        report_task: asyncio.Task[None] | None = None
        load_task: asyncio.Task[None] | None = None
        try:
            for item in config.listeners:
                if item.name in delegated:
                    continue
                try:
                    path = item.auth.credentials_file if item.auth else None
                    credentials = Credentials(path) if path else None
                    # A feedback listener's mail is a report to read, not mail to queue (mta.feedback).
                    taker = feedback if item.mode == "feedback" and feedback is not None else intake
                    handler = SessionHandler(item, config, taker, [storage(self.obs.disk.ready, item.name)],
                                             credentials=credentials, services=services,
                                             suppression=check_for(suppressions, item.name),
                                             workloads=self.workloads)
                    listener = Listener(item, config, handler)
                except (CredentialsError, TlsError) as exc:
                    raise StartupError(f"listener {item.name!r}: {exc}") from None
                try:
                    await listener.start()
                except OSError as exc:
                    raise StartupError(f"listener {item.name!r} cannot listen on {item.address}: "
                                       f"{exc.strerror}") from None
                self.listeners.append(listener)
            await self._start_api(intake, services, scheduler)
            try:
                await control.start()
                await health.start()
                await self.obs.start()
            except OSError as exc:
                raise StartupError(f"http.address {config.http.address} or control socket: {exc.strerror}") \
                    from None
            try:
                await self.drain.start(intake, scheduler.records)
            except OSError as exc:
                raise StartupError(f"drain.listen {config.drain.listen}: {exc.strerror}") from None
            identity.start()
            scheduler_task = asyncio.create_task(scheduler.run())
            if reporter is not None:
                report_task = asyncio.create_task(reporter.run())
            try:
                await workers.start()
            except WorkerError as exc:
                raise StartupError(str(exc)) from None
            event("started", hostname=config.hostname, pid=os.getpid(), workers=config.workers,
                  listeners=",".join(f"{item.name}={item.address}" for item in config.listeners))
            load_task = asyncio.create_task(self._load_queue(scheduler, cutoff))
            await self._wait_for_signal(scheduler_task, load_task)
        finally:
            if report_task is not None:
                report_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await report_task
            await identity.stop()
            await self._shutdown(scheduler, scheduler_task, control, health, workers, load_task)
            await limits.close()  # after the last session and delivery that counted in it

    async def _replicas(self) -> int:
        """How many pods share the limits: the StatefulSet's ``spec.replicas``
        where the Kubernetes API answers, else 1 (``limits.store.replicas`` wins)."""
        api = self.drain.api
        if self.config.limits.store.url is None or self.config.limits.store.replicas or api is None:
            return 1
        try:
            return await asyncio.to_thread(api.desired_replicas)
        except KubeError as exc:
            event("limits_replicas_unknown", level=logging.WARNING, error=str(exc),
                  reason="while the limits store is unreachable, this pod takes whole limits; "
                         "set limits.store.replicas")
            return 1

    async def _start_api(self, intake: Intake, services: AuthServices, scheduler: Scheduler) -> None:
        """The HTTP send API, when ``http_api.address`` is set: same intake, same rates as SMTP AUTH."""
        config = self.config.http_api
        if config.address is None:
            return
        try:
            # No keys file: only ServiceAccount tokens are taken (the config allows it with service_accounts).
            credentials = Credentials(config.keys_file) if config.keys_file else None
            keys = ApiKeys(credentials, services.gate, self.config.limits.auth_failure_delay)
            tls = ServerTls(config.tls.cert_file, config.tls.key_file).current() if config.tls else None
            self.idempotency = IdempotencyStore(self.config.spool.path / "idempotency.db")
        except CredentialsError as exc:
            raise StartupError(f"http_api.keys_file: {exc}") from None
        except TlsError as exc:
            raise StartupError(f"http_api.tls: {exc}") from None
        except sqlite3.Error as exc:
            raise StartupError(f"http_api: cannot open {self.config.spool.path / 'idempotency.db'}: {exc}") \
                from None
        self.api = ApiServer(self.config, intake, keys, services.rates,
                             admission=[storage(self.obs.disk.ready, "http_api")], records=scheduler.records,
                             idempotency=self.idempotency, stopping=lambda: self.stopping, tls=tls,
                             suppression=check_for(scheduler.suppressions, "http_api"), workloads=self.workloads,
                             esp_events=self.esp_events)
        try:
            await self.api.start()
        except OSError as exc:
            raise StartupError(f"http_api.address {config.address}: {exc.strerror}") from None

    async def _load_queue(self, scheduler: Scheduler, cutoff: str) -> None:
        """The spool's earlier mail, read in a thread while the listeners already take new mail."""
        started = time.monotonic()
        try:
            loaded = await asyncio.to_thread(self.spool.load, cutoff)
        except OSError as exc:
            raise StartupError(f"spool.path {self.config.spool.path}: cannot load the queue: "
                               f"{exc.strerror or exc}") from None
        scheduler.load(loaded.records)
        event("spool_loaded", path=str(self.config.spool_shard), messages=len(loaded.records),
              quarantined=len(loaded.corrupt), removed_uncommitted=loaded.removed_uncommitted,
              seconds=round(time.monotonic() - started, 3))

    async def _wait_for_signal(self, scheduler_task: asyncio.Task[None], load_task: asyncio.Task[None]) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        stopper = asyncio.create_task(stop.wait())
        watched = {stopper, scheduler_task, load_task}
        while stopper in watched:
            done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            if load_task in done:
                load_task.result()  # a spool that cannot be read stops the server, as it did at start
                watched.discard(load_task)
            if scheduler_task in done:
                stopper.cancel()
                scheduler_task.result()  # the scheduler must never end on its own: surface why
                break
            if stopper in done:
                break
        stopper.cancel()

    async def _shutdown(self, scheduler: Scheduler, scheduler_task: asyncio.Task[None] | None,
                        control: ControlServer, health: HealthServer, workers: Workers,
                        load_task: asyncio.Task[None] | None) -> None:
        self.stopping = True
        self.drain.stopping = True  # refuse handoffs from other pods from now on
        event("stopping", timeout=self.config.shutdown.timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.shutdown.timeout
        for listener in self.listeners:
            listener.stop_accepting()
        if self.api is not None:
            await self.api.stop()  # answers in flight are sent; what was answered 202 is on disk
        # Workers finish their sessions too, and announce what they stored, before delivery stops.
        await asyncio.gather(workers.stop(deadline), *(listener.drain(deadline) for listener in self.listeners))
        await scheduler.stop(time.monotonic() + max(0.0, deadline - loop.time()))
        if scheduler_task is not None:
            scheduler_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await scheduler_task
        if load_task is not None:
            # The loader's thread cannot be stopped, and a pod scaled away hands over its whole
            # queue, not the part loaded so far: the spool stays ours until the load is done.
            with contextlib.suppress(Exception):
                await load_task
        # Deliveries have stopped: a pod scaled away hands its queue to the pods that stay.
        await self.drain.drain_if_scaled_down(scheduler)
        await self.drain.stop()
        if self.pods is not None:
            self.pods.stop()
        await control.stop()
        await health.stop()
        await self.obs.stop()
        if self.tls_policy is not None:
            self.tls_policy.close()  # what the STARTTLS memory has not written yet
        self.spool.close()
        if self.idempotency is not None:
            self.idempotency.close()
        if self.tls_reports is not None:
            self.tls_reports.close()
        if scheduler.suppressions is not None:
            scheduler.suppressions.close()
        event("stopped")
