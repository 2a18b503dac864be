"""Which pod a client address belongs to: a list-and-watch of pods, informer-style.

For listeners with ``identify_pods``: a client that does not AUTH is known by
its source IP, looked up here, and the pod's namespace, ServiceAccount and
labels select its policy (``mta.policy.workloads``) — instead of trusting a
pod CIDR, through which every pod of the cluster could relay.  This holds
only if the IP kubemta sees is the pod's own: no SNAT between the app and
kubemta's Service (the README says how to check).

A thread per watched scope (``service_accounts.pod_namespaces``, or all
namespaces) lists the pods, then watches from the list's resourceVersion;
changes (a pod's labels edited, a pod deleted, its IP given to a new pod)
apply as they arrive.  Pods that finished (``Succeeded``/``Failed``) or have
no IP yet are not in the map: their address may already be another pod's.
When the watch ends (its timeout, 410 Gone, an error) the thread lists
again, after a back-off while errors repeat.

Failure: API errors are logged (``pod_watch_failed``) and retried; until the
first list has arrived ``synced`` is False and the session answers
``451 4.7.0`` rather than refusing a pod it simply does not know yet.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

from mta.k8s.api import KubeError
from mta.obs.log import event
from mta.policy.workloads import Workload

log = logging.getLogger(__name__)

WATCH_TIMEOUT = 240  # seconds a watch runs before it is started again (the API server's own bound is higher)
RETRY_FIRST, RETRY_MAX = 1.0, 30.0


class PodSource(Protocol):
    def list_pods(self, namespace: str | None) -> tuple[list[Any], str]: ...
    def watch_pods(self, namespace: str | None, resource_version: str, timeout: int) -> Any: ...


@dataclass(frozen=True)
class PodEntry:
    uid: str
    workload: Workload
    ips: tuple[str, ...] = field(default_factory=tuple)


def _entry(pod: Any) -> PodEntry | None:
    """What the map keeps of a pod (a client model object), or None for a pod without a live IP."""
    meta, spec, status = pod.metadata, pod.spec, pod.status
    if status is None or status.phase in ("Succeeded", "Failed") or meta.deletion_timestamp is not None:
        return None
    ips = tuple(item.ip for item in (status.pod_ips or []) if item.ip) or ((status.pod_ip,) if status.pod_ip else ())
    if not ips:
        return None
    account = (spec.service_account_name if spec is not None else None) or "default"
    workload = Workload(meta.namespace, account, meta.name, dict(meta.labels or {}))
    return PodEntry(meta.uid, workload, ips)


class PodDirectory:
    def __init__(self, source: PodSource, namespaces: list[str], watch_timeout: int = WATCH_TIMEOUT) -> None:
        self.source = source
        self.scopes: list[str | None] = list(namespaces) or [None]
        self.watch_timeout = watch_timeout
        self._lock = threading.Lock()
        self._by_ip: dict[str, PodEntry] = {}
        self._by_uid: dict[str, PodEntry] = {}
        self._synced: set[str | None] = set()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def synced(self) -> bool:
        return len(self._synced) == len(self.scopes)

    def lookup(self, ip: str) -> Workload | None:
        with self._lock:
            entry = self._by_ip.get(ip)
        return entry.workload if entry is not None else None

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_uid)

    # -- the map ----------------------------------------------------------------

    def _forget(self, uid: str) -> None:
        old = self._by_uid.pop(uid, None)
        for ip in old.ips if old is not None else ():
            if self._by_ip.get(ip) is old:
                del self._by_ip[ip]

    def _apply(self, kind: str, pod: Any) -> None:
        uid = pod.metadata.uid
        entry = None if kind == "DELETED" else _entry(pod)
        with self._lock:
            self._forget(uid)
            if entry is not None:
                self._by_uid[uid] = entry
                for ip in entry.ips:
                    self._by_ip[ip] = entry  # an address taken over by a new pod is the new pod's

    def _replace(self, scope: str | None, pods: list[Any]) -> None:
        with self._lock:
            for uid, old in list(self._by_uid.items()):
                if scope is None or old.workload.namespace == scope:
                    self._forget(uid)
        for pod in pods:
            self._apply("ADDED", pod)

    # -- the threads ------------------------------------------------------------

    def start(self) -> None:
        for scope in self.scopes:
            thread = threading.Thread(target=self._run, args=(scope,), name=f"pod-watch-{scope or 'all'}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop watching; a thread blocked in a watch request ends with it (daemon threads)."""
        self._stop.set()

    def _run(self, scope: str | None) -> None:
        delay = RETRY_FIRST
        while not self._stop.is_set():
            try:
                pods, version = self.source.list_pods(scope)
                self._replace(scope, pods)
                self._synced.add(scope)
                delay = RETRY_FIRST
                while not self._stop.is_set():
                    for kind, pod, latest in self.source.watch_pods(scope, version, self.watch_timeout):
                        if self._stop.is_set():
                            return
                        version = latest or version
                        if pod is not None and kind in ("ADDED", "MODIFIED", "DELETED"):
                            self._apply(kind, pod)
                    self._stop.wait(0.1)  # a watch the server ends at once must not become a busy loop
            except KubeError as exc:
                event("pod_watch_failed", level=logging.WARNING, namespace=scope or "*", error=str(exc),
                      retry=delay)
                self._stop.wait(delay)
                delay = min(RETRY_MAX, delay * 2)
