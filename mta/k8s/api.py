"""The API server, through the official ``kubernetes`` client.

Owns the calls the pod makes, which are all its Role allows: reading
its own StatefulSet (``GET /apis/apps/v1/namespaces/NS/statefulsets/NAME``)
for ``spec.replicas``, and creating Events on its own Pod (``POST
/api/v1/namespaces/NS/events``).  With ``service_accounts`` (the
``workload-identity`` component's ClusterRole) also: TokenReviews
(``POST /apis/authentication.k8s.io/v1/tokenreviews``), a namespace's labels
(``GET /api/v1/namespaces/NS``), and listing and watching pods
(``mta.k8s.pods``).  The client is configured from
``kubernetes.api_url`` (+ token and CA files) when given, which is how tests
point it at a local server, else from the in-cluster service account.

The ``kubernetes`` package is imported when the first ``KubeApi`` is built:
it costs a quarter of a second, which every ``mta serve`` outside a cluster
(and every CLI call) would otherwise pay for an API it never calls.

Calls block; async callers run them in a thread.  Failure: every call raises
``KubeError`` with the reason (HTTP status and message, or the connection
error); nothing here retries.
"""

from __future__ import annotations

import datetime as dt
import logging
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from mta.config import KubernetesConfig
from mta.k8s.identity import PodIdentity

if TYPE_CHECKING:
    from kubernetes import client

log = logging.getLogger(__name__)

COMPONENT = "kubemta"


class KubeError(Exception):
    pass


def _configuration(config: KubernetesConfig) -> client.Configuration:
    from kubernetes import client
    from kubernetes import config as kube_config
    from kubernetes.config.config_exception import ConfigException

    configuration = client.Configuration()
    if config.api_url is None:
        try:
            kube_config.load_incluster_config(client_configuration=configuration)
        except ConfigException as exc:
            raise KubeError(f"not running in a cluster and kubernetes.api_url is not set: {exc}") from None
        return configuration
    configuration.host = config.api_url.rstrip("/")
    if config.token_file is not None:
        configuration.api_key = {"authorization": config.token_file.read_text().strip()}
        configuration.api_key_prefix = {"authorization": "Bearer"}
    if config.ca_file is not None:
        configuration.ssl_ca_cert = str(config.ca_file)
    return configuration


def _failures() -> tuple[type[Exception], ...]:
    """What a call of the client raises when the API cannot be reached or refuses."""
    import urllib3
    from kubernetes.client.exceptions import ApiException

    return ApiException, urllib3.exceptions.HTTPError, OSError


def _reason(exc: Exception) -> str:
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException):
        return f"HTTP {exc.status} {exc.reason}: {(exc.body or '')[:300]!s}"
    return f"{type(exc).__name__}: {exc}"


class KubeApi:
    def __init__(self, config: KubernetesConfig, pod: PodIdentity) -> None:
        self.config = config
        self.pod = pod
        from kubernetes import client

        self._models: Any = client
        self._client = client.ApiClient(_configuration(config))
        self._apps = client.AppsV1Api(self._client)
        self._core = client.CoreV1Api(self._client)
        self._authn = client.AuthenticationV1Api(self._client)

    def close(self) -> None:
        self._client.close()

    def desired_replicas(self) -> int:
        """``spec.replicas`` of this pod's StatefulSet."""
        try:
            statefulset = self._apps.read_namespaced_stateful_set(
                self.pod.statefulset, self.pod.namespace, _request_timeout=self.config.timeout)
        except _failures() as exc:
            raise KubeError(f"cannot read StatefulSet {self.pod.namespace}/{self.pod.statefulset}: "
                            f"{_reason(exc)}") from None
        replicas = statefulset.spec.replicas
        return 1 if replicas is None else int(replicas)  # the API's default

    def event(self, reason: str, message: str, kind: str = "Normal") -> None:
        """Record an Event on this pod (``kind``: Normal or Warning)."""
        now = dt.datetime.now(dt.UTC)
        client = self._models
        body = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{self.pod.name}.", namespace=self.pod.namespace),
            involved_object=client.V1ObjectReference(api_version="v1", kind="Pod", name=self.pod.name,
                                                     namespace=self.pod.namespace, uid=self.pod.uid),
            reason=reason,
            message=message[:1024],
            type=kind,
            count=1,
            first_timestamp=now,
            last_timestamp=now,
            source=client.V1EventSource(component=COMPONENT, host=socket.gethostname()),
            reporting_component=COMPONENT,
            reporting_instance=self.pod.name,
        )
        try:
            self._core.create_namespaced_event(self.pod.namespace, body, _request_timeout=self.config.timeout)
        except _failures() as exc:
            raise KubeError(f"cannot create Event {reason}: {_reason(exc)}") from None


    def token_review(self, token: str, audiences: list[str]) -> dict[str, Any]:
        """The ``status`` of a TokenReview of ``token`` for ``audiences``, as the API's JSON names it."""
        client = self._models
        body = client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token, audiences=audiences))
        try:
            review = self._authn.create_token_review(body, _request_timeout=self.config.timeout)
        except _failures() as exc:
            raise KubeError(f"cannot review a token: {_reason(exc)}") from None
        status = review.status
        user = status.user if status is not None else None
        return {"authenticated": bool(status and status.authenticated), "audiences": list(status.audiences or [])
                if status else [], "error": status.error if status else None,
                "user": {"username": user.username, "extra": user.extra or {}} if user is not None else {}}

    def namespace_labels(self, namespace: str) -> dict[str, str]:
        try:
            found = self._core.read_namespace(namespace, _request_timeout=self.config.timeout)
        except _failures() as exc:
            raise KubeError(f"cannot read namespace {namespace}: {_reason(exc)}") from None
        return dict(found.metadata.labels or {})

    def list_pods(self, namespace: str | None) -> tuple[list[Any], str]:
        """Every pod (of ``namespace``, or of all), and the list's resourceVersion to watch from."""
        try:
            if namespace is None:
                listed = self._core.list_pod_for_all_namespaces(_request_timeout=self.config.timeout)
            else:
                listed = self._core.list_namespaced_pod(namespace, _request_timeout=self.config.timeout)
        except _failures() as exc:
            raise KubeError(f"cannot list pods{' in ' + namespace if namespace else ''}: {_reason(exc)}") from None
        return list(listed.items), listed.metadata.resource_version

    def watch_pods(self, namespace: str | None, resource_version: str, timeout: int) -> Iterator[tuple[str, Any, str]]:
        """Pod changes since ``resource_version`` for up to ``timeout`` seconds: (type, pod, resourceVersion).

        A ``BOOKMARK`` carries no pod (None), only the version to go on from.  Raises ``KubeError``
        when the watch ends in an error (410 Gone among them: list again)."""
        from kubernetes import watch

        stream = watch.Watch()
        kwargs: dict[str, Any] = {"resource_version": resource_version, "timeout_seconds": timeout,
                                  "allow_watch_bookmarks": True, "_request_timeout": timeout + self.config.timeout}
        args = () if namespace is None else (namespace,)
        call = self._core.list_pod_for_all_namespaces if namespace is None else self._core.list_namespaced_pod
        try:
            for item in stream.stream(call, *args, **kwargs):
                if item is None:
                    continue
                kind = item["type"]
                yield kind, None if kind == "BOOKMARK" else item["object"], stream.resource_version
        except _failures() as exc:
            raise KubeError(f"pod watch ended: {_reason(exc)}") from None
        finally:
            stream.stop()


def try_event(api: KubeApi | None, reason: str, message: str, kind: str = "Normal") -> None:
    """An Event where one can be made; a failure is only logged (Events are a side channel)."""
    if api is None:
        return
    try:
        api.event(reason, message, kind)
    except KubeError as exc:
        log.warning("%s", exc)
