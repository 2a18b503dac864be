"""The drain as part of ``mta serve``: the handoff endpoint and the scale-down check.

At start: when ``drain.listen`` is set, the handoff endpoint runs so other
pods can hand mail to this one.  At shutdown, after the listeners and the
scheduler have stopped: when ``kubernetes.enabled`` and
``drain.on_scale_down``, read the StatefulSet's ``spec.replicas``; a pod
whose ordinal is not below it is being scaled away and hands every queued
message to the pods that stay (ordinals ``0 .. replicas-1``), then leaves
its spool empty.  A rolling restart keeps ``replicas`` as it is, so the
mail stays on the volume for the pod's next start.

Failure: never stops a shutdown.  An API error, a target that refuses, or
the ``drain.timeout`` deadline leaves the rest of the mail in the spool, is
logged, and becomes a Warning Event on the pod where the API can be reached.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Container

from mta.config import Config
from mta.drain import tls, wire
from mta.drain.receiver import HandoffServer
from mta.drain.sender import DrainReport, Target, hand_over
from mta.hostport import parse_host_port
from mta.intake import Intake
from mta.k8s.api import KubeApi, KubeError, try_event
from mta.k8s.identity import IdentityError, PodIdentity, pod_identity
from mta.obs.log import event
from mta.scheduler.queue import Scheduler
from mta.smtp.tls import ServerTls, TlsError
from spool import Spool

log = logging.getLogger(__name__)


class DrainError(Exception):
    """The drain cannot be set up as configured (a start-up error)."""


def peer_targets(config: Config, pod: PodIdentity, replicas: int) -> list[Target]:
    """Handoff addresses and names of the pods that stay, without this one."""
    targets: list[Target] = []
    for ordinal in range(replicas):
        if ordinal == pod.ordinal:
            continue
        address = config.drain.peer_address.format(statefulset=pod.statefulset, ordinal=ordinal,
                                                    namespace=pod.namespace)
        if address not in {t.address for t in targets}:
            targets.append(Target(address, f"{pod.statefulset}-{ordinal}"))
    return targets


class DrainService:
    def __init__(self, config: Config, spool: Spool) -> None:
        self.config = config
        self.spool = spool
        self.secret: bytes | None = None
        self.pod: PodIdentity | None = None
        self.api: KubeApi | None = None
        self.server: HandoffServer | None = None
        self.server_tls: ServerTls | None = None
        self.stopping = False

    def setup(self) -> None:
        """Read the secret and the pod identity; raise ``DrainError`` naming what is wrong."""
        drain, kube = self.config.drain, self.config.kubernetes
        if drain.secret_file is not None and not drain.secret_file.exists():
            event("drain_disabled", level=logging.WARNING, secret_file=str(drain.secret_file),
                  reason="the secret file does not exist: no handoffs on scale-down")
        elif drain.secret_file is not None:
            try:
                self.secret = wire.read_secret(drain.secret_file)
            except (OSError, wire.WireError) as exc:
                raise DrainError(f"drain.secret_file: {exc}") from None
        if drain.tls is not None:
            try:
                self.server_tls = tls.server_tls(drain.tls)
                tls.client_context(drain.tls)  # loads now: a bad file stops start-up, not the drain
            except (OSError, ssl.SSLError, TlsError) as exc:
                raise DrainError(f"drain.tls: {exc}") from None
        if kube.enabled:
            try:
                self.pod = pod_identity(kube)
                self.api = KubeApi(kube, self.pod)
            except (IdentityError, KubeError) as exc:
                raise DrainError(f"kubernetes: {exc}") from None

    async def start(self, intake: Intake, queued: Container[str]) -> None:
        if self.config.drain.listen is None or self.secret is None:
            return
        host, port = parse_host_port(self.config.drain.listen)
        pod_name = self.pod.name if self.pod is not None else self.config.identity.pod_name
        assert pod_name is not None  # filled in at load (mta.identity.pod)
        self.server = HandoffServer(host, port, self.secret, intake, queued,
                                    self.config.limits.max_message_size, lambda: self.stopping,
                                    pod_name=pod_name, tls=self.server_tls)
        await self.server.start()

    async def stop(self) -> None:
        self.stopping = True
        if self.server is not None:
            await self.server.stop()
        if self.api is not None:
            self.api.close()

    async def drain_if_scaled_down(self, scheduler: Scheduler) -> DrainReport | None:
        """At shutdown: hand all mail over when this pod's ordinal is no longer wanted."""
        if self.pod is None or self.api is None or not self.config.drain.on_scale_down:
            return None
        pod, api = self.pod, self.api
        try:
            replicas = await asyncio.to_thread(api.desired_replicas)
        except KubeError as exc:
            event("drain_skipped", level=logging.WARNING, pod=pod.name, reason=str(exc))
            return None
        if pod.ordinal < replicas:
            event("drain_not_needed", pod=pod.name, ordinal=pod.ordinal, replicas=replicas)
            return None
        records = list(scheduler.records.values())
        event("drain_started", pod=pod.name, ordinal=pod.ordinal, replicas=replicas, messages=len(records))
        client_tls, server_name, tls_error = None, None, None
        if self.config.drain.tls is not None:
            server_name = self.config.drain.tls.server_name
            try:  # from the files as they are now: cert-manager may have renewed them since start
                client_tls = tls.client_context(self.config.drain.tls)
            except (OSError, ssl.SSLError) as exc:
                tls_error = f"drain.tls: {exc}"
        if self.secret is None or tls_error is not None:
            report = DrainReport(left=[r.id for r in records],
                                 errors=[tls_error or "drain.secret_file is not set"])
        else:
            targets = peer_targets(self.config, pod, replicas)
            await asyncio.to_thread(try_event, api, "Draining",
                                    f"scaled down to {replicas} replicas: handing {len(records)} queued "
                                    f"message(s) to {', '.join(t.address for t in targets) or 'no pod'}")
            deadline = time.monotonic() + self.config.drain.timeout
            report = await hand_over(self.spool, records, targets, self.secret, deadline, client_tls, server_name)
        summary = f"moved={report.moved} duplicates={report.duplicates} left={len(report.left)}"
        if report.complete:
            event("drain_finished", pod=pod.name, moved=report.moved, duplicates=report.duplicates)
            await asyncio.to_thread(try_event, api, "Drained", f"spool handed over and empty ({summary})")
        else:
            event("drain_incomplete", level=logging.ERROR, pod=pod.name, moved=report.moved,
                  left=len(report.left), errors="; ".join(report.errors[-5:]))
            await asyncio.to_thread(
                try_event, api, "DrainIncomplete",
                f"{summary}; the rest stays on this pod's volume (run the spool-rescue Job): "
                f"{'; '.join(report.errors[-3:])}", "Warning")
        return report
