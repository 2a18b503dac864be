"""Which account policy a cluster workload gets, from its identity and labels.

A workload is a ServiceAccount (``system:serviceaccount:<namespace>:<name>``),
proven by a token (``mta.auth.workload``) or by the pod a connection comes
from (``mta.k8s.pods``).  Its policy is, first match wins:
``accounts.workloads["<namespace>/<name>"]``, then ``["<namespace>/*"]``,
then the first ``accounts.workload_selectors`` entry whose labels the
namespace (and, for a pod, the pod) carries, then
``accounts.workload_default``.  None means the workload may not send:
deny by default, so a new namespace gains nothing until an operator says so.

``Principal`` is what a session or an HTTP request is authenticated as: a
name (the password user, or the workload's identity) and its policy.

``WorkloadIdentity`` puts it together for the session and the HTTP API: a
token (``mta.auth.workload``) or a client address (``mta.k8s.pods``) becomes
a ``Principal``; namespace labels are read from the API server only when a
selector asks for them, and kept ``NAMESPACE_TTL``.

Failure: no policy is an answer (``None``), and the caller refuses with
``550 5.7.1`` naming the identity.  ``IdentityUnavailable`` when who a
client is cannot be known now (the pod list not loaded yet, a namespace
unreadable): the caller answers with a temporary error.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from mta.config import AccountPolicy, AccountsConfig

PREFIX = "system:serviceaccount:"
NAMESPACE_TTL = 60.0
NAMESPACE_CACHE = 1024


class IdentityUnavailable(Exception):
    """Who the client is cannot be known now; try again later."""


@dataclass(frozen=True)
class Workload:
    namespace: str
    service_account: str
    pod: str | None = None  # known for a pod found by IP, or from a bound token's claims
    pod_labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{PREFIX}{self.namespace}:{self.service_account}"

    @classmethod
    def from_username(cls, username: str, pod: str | None = None) -> Workload | None:
        """The workload a TokenReview user name (or a token's ``sub``) names, or None for anything else."""
        if not username.startswith(PREFIX):
            return None
        namespace, colon, name = username.removeprefix(PREFIX).partition(":")
        return cls(namespace, name, pod) if colon and namespace and name and ":" not in name else None


@dataclass(frozen=True)
class Principal:
    """Who a session or request is authenticated as, and what it may send (None: nothing)."""

    name: str
    policy: AccountPolicy | None
    workload: Workload | None = None

    @property
    def namespace(self) -> str | None:
        return self.workload.namespace if self.workload is not None else None


def _matches(wanted: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in wanted.items())


def policy_for(accounts: AccountsConfig, workload: Workload,
               namespace_labels: Mapping[str, str] | None = None) -> AccountPolicy | None:
    named = accounts.workloads.get(f"{workload.namespace}/{workload.service_account}")
    if named is None:
        named = accounts.workloads.get(f"{workload.namespace}/*")
    if named is not None:
        return named
    for selector in accounts.workload_selectors:
        if selector.namespace_labels and not _matches(selector.namespace_labels, namespace_labels or {}):
            continue
        if selector.pod_labels and not _matches(selector.pod_labels, workload.pod_labels):
            continue
        return selector.policy
    return accounts.workload_default


def needs_namespace_labels(accounts: AccountsConfig) -> bool:
    """Whether a selector reads namespace labels (only then is the namespace looked up)."""
    return any(selector.namespace_labels for selector in accounts.workload_selectors)


class Tokens(Protocol):
    async def verify(self, token: str) -> Workload: ...


class Pods(Protocol):
    @property
    def synced(self) -> bool: ...
    def lookup(self, ip: str) -> Workload | None: ...


class WorkloadIdentity:
    def __init__(self, accounts: AccountsConfig, tokens: Tokens | None = None, pods: Pods | None = None,
                 namespace_labels: Callable[[str], dict[str, str]] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.accounts, self.tokens, self.pods = accounts, tokens, pods
        self._fetch = namespace_labels if needs_namespace_labels(accounts) else None
        self.clock = clock
        self._labels: OrderedDict[str, tuple[dict[str, str], float]] = OrderedDict()

    async def _namespace_labels(self, namespace: str) -> dict[str, str]:
        if self._fetch is None:
            return {}
        hit = self._labels.get(namespace)
        if hit is not None and hit[1] > self.clock():
            return hit[0]
        try:
            labels = await asyncio.to_thread(self._fetch, namespace)
        except Exception as exc:  # noqa: BLE001 - the API's failures (KubeError) and the client's own
            raise IdentityUnavailable(f"cannot read the labels of namespace {namespace}: {exc}") from None
        self._labels[namespace] = (labels, self.clock() + NAMESPACE_TTL)
        self._labels.move_to_end(namespace)
        while len(self._labels) > NAMESPACE_CACHE:
            self._labels.popitem(last=False)
        return labels

    async def principal(self, workload: Workload) -> Principal:
        labels = await self._namespace_labels(workload.namespace)
        return Principal(workload.name, policy_for(self.accounts, workload, labels), workload)

    async def from_token(self, token: str) -> Principal:
        """``mta.auth.workload``'s ``TokenRefused`` or ``TokenUnchecked`` propagate."""
        assert self.tokens is not None
        return await self.principal(await self.tokens.verify(token))

    async def from_address(self, ip: str) -> Principal | None:
        """The principal of the pod at ``ip``; None when no pod has it."""
        if self.pods is None:
            return None
        if not self.pods.synced:
            raise IdentityUnavailable("the pod list has not been loaded yet")
        workload = self.pods.lookup(ip)
        return await self.principal(workload) if workload is not None else None
