"""A small Kubernetes API server for tests: real paths, real JSON objects.

No cluster can run on the test machines, so this serves the part of the API
that kubemta uses, the way the real API server does:

- ``GET /apis/apps/v1/namespaces/NS/statefulsets/NAME``: an ``apps/v1``
  StatefulSet with metadata, ``spec`` (replicas, selector, serviceName,
  template) and ``status``;
- ``GET|PATCH .../statefulsets/NAME/scale``: an ``autoscaling/v1`` Scale
  (what ``kubectl scale`` and a HorizontalPodAutoscaler change);
- ``POST /api/v1/namespaces/NS/events``: a ``v1`` Event, answered 201 with
  the stored object (``metadata.generateName`` resolved, uid,
  resourceVersion, creationTimestamp); ``GET`` lists them as an EventList;
- ``POST /apis/authentication.k8s.io/v1/tokenreviews``: an
  ``authentication.k8s.io/v1`` TokenReview, answered as the API server does
  for ServiceAccount tokens signed by ``issuer_key`` (RS256; audience, expiry
  and the ``revoked`` set checked; ``status.error`` says why not);
- ``GET /api/v1/namespaces/NS``: a ``v1`` Namespace with its labels;
- ``GET /api/v1/pods`` and ``/api/v1/namespaces/NS/pods``: a PodList with
  its resourceVersion, or with ``watch=true`` a stream of watch events
  (one JSON object per line: ADDED, MODIFIED, DELETED; BOOKMARK when asked)
  from ``resourceVersion`` on (the whole history is kept), held open until
  ``timeoutSeconds`` (at most 30) or ``stop()``;
- ``GET /.well-known/openid-configuration`` and ``/openid/v1/jwks``: the
  issuer's discovery document and public keys, as the API server serves
  them for ``--service-account-issuer`` (``issuer`` may be set to ``url`` so
  discovery works from the issuer name);
- anything else, or a missing object: a ``v1`` Status with the real
  reason and code (NotFound 404, Unauthorized 401, MethodNotAllowed 405).

``failing`` names resources (``pods``, ``tokenreviews``, ``namespaces``, ...)
answered ``503 ServiceUnavailable`` while listed, as an overloaded or
restarting API server answers.

With a token set, requests without ``Authorization: Bearer <token>`` get
401, as a real server does.  Runs in a thread of the test process on
loopback; ``stop()`` shuts it down.  Failure: ``start()`` raises OSError
when the port cannot be bound.
"""

from __future__ import annotations

import copy
import datetime as dt
import itertools
import json
import re
import secrets
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

STS = re.compile(r"^/apis/apps/v1/namespaces/(?P<ns>[^/]+)/statefulsets/(?P<name>[^/]+)(?P<scale>/scale)?$")
EVENTS = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/events$")
NAMESPACE = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)$")
PODS = re.compile(r"^/api/v1(?:/namespaces/(?P<ns>[^/]+))?/pods$")
JWKS_PATH = "/openid/v1/jwks"
DISCOVERY_PATH = "/.well-known/openid-configuration"
TOKEN_REVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"
ISSUER = "https://kubernetes.default.svc.cluster.local"


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status(code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                            "message": message, "reason": reason, "code": code}
    if details:
        body["details"] = details
    return body


def statefulset(namespace: str, name: str, replicas: int) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/component": "mta"}
    return {
        "kind": "StatefulSet",
        "apiVersion": "apps/v1",
        "metadata": {"name": name, "namespace": namespace, "uid": str(uuid.uuid4()), "resourceVersion": "1",
                     "generation": 1, "creationTimestamp": _now(), "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels},
                         "spec": {"containers": [{"name": "mta", "image": "kubemta/kubemta:0.1.0"}]}},
            "serviceName": f"{name}-headless",
            "podManagementPolicy": "Parallel",
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": 0}},
            "revisionHistoryLimit": 10,
            "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Retain", "whenScaled": "Retain"},
        },
        "status": {"observedGeneration": 1, "replicas": replicas, "readyReplicas": replicas,
                   "currentReplicas": replicas, "updatedReplicas": replicas, "availableReplicas": replicas},
    }


class FakeKubeApi:
    def __init__(self, host: str = "127.0.0.1", token: str | None = None) -> None:
        self.host = host
        self.token = token
        self.lock = threading.Lock()
        self.statefulsets: dict[tuple[str, str], dict[str, Any]] = {}
        self.events: dict[str, list[dict[str, Any]]] = {}
        self.requests: list[tuple[str, str]] = []
        # The service-account issuer: tokens signed with it are real JWTs (tests.fakes.kube_api.issue).
        from cryptography.hazmat.primitives.asymmetric import rsa

        self.issuer_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.revoked: set[str] = set()  # tokens whose pod or ServiceAccount is gone
        self.reviews = 0
        self.issuer = ISSUER  # the iss of issued tokens; set to self.url for discovery by issuer name
        self.namespaces: dict[str, dict[str, str]] = {}  # name -> labels
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.changes = threading.Condition(self.lock)
        self.pod_history: list[tuple[int, str, dict[str, Any]]] = []  # (resourceVersion, type, pod) for watches
        self.watches = 0  # watch requests served
        self._stopping = False
        self.failing: set[str] = set()
        self._versions = itertools.count(2)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://{self.host}:{self._server.server_address[1]}"

    # -- state the tests set and read -------------------------------------------

    def add_statefulset(self, namespace: str, name: str, replicas: int) -> None:
        with self.lock:
            self.statefulsets[(namespace, name)] = statefulset(namespace, name, replicas)

    def scale(self, namespace: str, name: str, replicas: int) -> None:
        with self.lock:
            obj = self.statefulsets[(namespace, name)]
            obj["spec"]["replicas"] = replicas
            obj["metadata"]["generation"] += 1
            obj["metadata"]["resourceVersion"] = str(next(self._versions))

    def events_for(self, namespace: str, pod: str) -> list[dict[str, Any]]:
        with self.lock:
            return [copy.deepcopy(e) for e in self.events.get(namespace, [])
                    if e.get("involvedObject", {}).get("name") == pod]

    def add_pod(self, namespace: str, name: str, ip: str, service_account: str = "default",
                labels: dict[str, str] | None = None, phase: str = "Running") -> None:
        pod = {"kind": "Pod", "apiVersion": "v1",
               "metadata": {"name": name, "namespace": namespace, "uid": str(uuid.uuid4()),
                            "labels": dict(labels or {}), "creationTimestamp": _now()},
               "spec": {"serviceAccountName": service_account,
                        "containers": [{"name": "app", "image": "registry.example/app:1"}]},
               "status": {"phase": phase, "podIP": ip, "podIPs": [{"ip": ip}]}}
        self._pod_changed("ADDED", pod)

    def label_pod(self, namespace: str, name: str, labels: dict[str, str]) -> None:
        with self.lock:
            pod = copy.deepcopy(self.pods[(namespace, name)])
        pod["metadata"]["labels"] = dict(labels)
        self._pod_changed("MODIFIED", pod)

    def delete_pod(self, namespace: str, name: str) -> None:
        with self.lock:
            pod = copy.deepcopy(self.pods[(namespace, name)])
        self._pod_changed("DELETED", pod)

    def _pod_changed(self, kind: str, pod: dict[str, Any]) -> None:
        with self.changes:
            version = next(self._versions)
            pod["metadata"]["resourceVersion"] = str(version)
            key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
            if kind == "DELETED":
                self.pods.pop(key, None)
            else:
                self.pods[key] = pod
            self.pod_history.append((version, kind, copy.deepcopy(pod)))
            self.changes.notify_all()

    def jwks(self) -> dict[str, Any]:
        from jwt.algorithms import RSAAlgorithm

        key = RSAAlgorithm.to_jwk(self.issuer_key.public_key(), as_dict=True)
        return {"keys": [{**key, "kid": "test-issuer", "use": "sig", "alg": "RS256"}]}

    def issue(self, namespace: str, service_account: str, audience: str = "kubemta", lifetime: float = 600,
              pod: str | None = None) -> str:
        """A projected ServiceAccount token, as the kubelet mounts it (claims of a bound token)."""
        import time

        import jwt

        now = int(time.time())
        claims: dict[str, Any] = {"iss": self.issuer, "aud": [audience], "sub": f"system:serviceaccount:{namespace}:"
                                  f"{service_account}", "iat": now, "nbf": now, "exp": int(now + lifetime),
                                  "kubernetes.io": {"namespace": namespace,
                                                    "serviceaccount": {"name": service_account,
                                                                       "uid": str(uuid.uuid4())}}}
        if pod is not None:
            claims["kubernetes.io"]["pod"] = {"name": pod, "uid": str(uuid.uuid4())}
        return jwt.encode(claims, self.issuer_key, algorithm="RS256", headers={"kid": "test-issuer"})

    # -- lifetime ----------------------------------------------------------------

    def start(self) -> None:
        fake = self
        self._stopping = False

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # a watch is a chunked stream, as the real API server sends it

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                fake._handle(self, "GET")

            def do_POST(self) -> None:
                fake._handle(self, "POST")

            def do_PATCH(self) -> None:
                fake._handle(self, "PATCH")

            def do_PUT(self) -> None:
                fake._handle(self, "PUT")

            def do_DELETE(self) -> None:
                fake._handle(self, "DELETE")

        self._server = ThreadingHTTPServer((self.host, 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-kube-api", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self.changes:
            self._stopping = True
            self.changes.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> FakeKubeApi:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the API -------------------------------------------------------------------

    def _reply(self, handler: BaseHTTPRequestHandler, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        handler.send_response(code)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def _body(self, handler: BaseHTTPRequestHandler) -> Any:
        length = int(handler.headers.get("Content-Length") or 0)
        return json.loads(handler.rfile.read(length) or b"null")

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        path = handler.path.split("?", 1)[0]
        with self.lock:
            self.requests.append((method, path))
        if self.token is not None and handler.headers.get("Authorization") != f"Bearer {self.token}":
            self._reply(handler, 401, status(401, "Unauthorized", "Unauthorized"))
            return
        if self.failing and set(path.split("/")) & self.failing:
            self._reply(handler, 503, status(503, "ServiceUnavailable", "the server is currently unable to handle "
                                             "the request"))
            return
        try:
            if match := STS.match(path):
                self._statefulset(handler, method, match["ns"], match["name"], bool(match["scale"]))
            elif match := EVENTS.match(path):
                self._events(handler, method, match["ns"])
            elif path == TOKEN_REVIEWS and method == "POST":
                self._token_review(handler)
            elif (match := PODS.match(path)) and method == "GET":
                query = urllib.parse.parse_qs(handler.path.partition("?")[2])
                if query.get("watch", [""])[0] in ("true", "1", "True"):
                    self._watch_pods(handler, match["ns"], query)
                else:
                    self._list_pods(handler, match["ns"])
            elif (match := NAMESPACE.match(path)) and method == "GET":
                self._namespace(handler, match["ns"])
            elif path == DISCOVERY_PATH and method == "GET":
                self._reply(handler, 200, {"issuer": self.issuer, "jwks_uri": self.url + JWKS_PATH,
                                           "response_types_supported": ["id_token"],
                                           "subject_types_supported": ["public"],
                                           "id_token_signing_alg_values_supported": ["RS256"]})
            elif path == JWKS_PATH and method == "GET":
                self._reply(handler, 200, self.jwks())
            else:
                self._reply(handler, 404, status(404, "NotFound", "the server could not find the requested resource"))
        except (ValueError, KeyError, TypeError) as exc:
            self._reply(handler, 400, status(400, "BadRequest", f"the request is invalid: {exc}"))

    def _statefulset(self, handler: BaseHTTPRequestHandler, method: str, ns: str, name: str, scale: bool) -> None:
        with self.lock:
            obj = copy.deepcopy(self.statefulsets.get((ns, name)))
        if obj is None:
            self._reply(handler, 404, status(404, "NotFound", f'statefulsets.apps "{name}" not found',
                                             {"name": name, "group": "apps", "kind": "statefulsets"}))
            return
        if method == "PATCH" and scale:
            patch = self._body(handler)
            self.scale(ns, name, int(patch["spec"]["replicas"]))
            with self.lock:
                obj = copy.deepcopy(self.statefulsets[(ns, name)])
        elif method != "GET":
            self._reply(handler, 405, status(405, "MethodNotAllowed", f"{method} is not supported here"))
            return
        if not scale:
            self._reply(handler, 200, obj)
            return
        meta = obj["metadata"]
        self._reply(handler, 200, {
            "kind": "Scale", "apiVersion": "autoscaling/v1",
            "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")},
            "spec": {"replicas": obj["spec"]["replicas"]},
            "status": {"replicas": obj["status"]["replicas"],
                       "selector": ",".join(f"{k}={v}" for k, v in obj["spec"]["selector"]["matchLabels"].items())},
        })

    def _events(self, handler: BaseHTTPRequestHandler, method: str, ns: str) -> None:
        if method == "GET":
            with self.lock:
                items = copy.deepcopy(self.events.get(ns, []))
            self._reply(handler, 200, {"kind": "EventList", "apiVersion": "v1",
                                       "metadata": {"resourceVersion": "1"}, "items": items})
            return
        if method != "POST":
            self._reply(handler, 405, status(405, "MethodNotAllowed", f"{method} is not supported here"))
            return
        event = self._body(handler)
        if not isinstance(event, dict) or event.get("kind", "Event") != "Event":
            self._reply(handler, 400, status(400, "BadRequest", "the body is not an Event"))
            return
        meta = event.setdefault("metadata", {})
        if not meta.get("name"):
            if not meta.get("generateName"):
                self._reply(handler, 422, status(422, "Invalid", "Event is invalid: metadata.name: Required value"))
                return
            meta["name"] = meta["generateName"] + secrets.token_hex(8)
        if meta.get("namespace", ns) != ns:
            self._reply(handler, 400, status(400, "BadRequest", "the namespace of the object does not match"))
            return
        for field in ("involvedObject", "reason"):
            if not event.get(field):
                self._reply(handler, 422, status(422, "Invalid", f"Event is invalid: {field}: Required value"))
                return
        meta.update({"namespace": ns, "uid": str(uuid.uuid4()), "resourceVersion": str(next(self._versions)),
                     "creationTimestamp": _now()})
        event["kind"], event["apiVersion"] = "Event", "v1"
        with self.lock:
            self.events.setdefault(ns, []).append(event)
        self._reply(handler, 201, event)

    def _namespace(self, handler: BaseHTTPRequestHandler, ns: str) -> None:
        with self.lock:
            labels = self.namespaces.get(ns)
        if labels is None:
            self._reply(handler, 404, status(404, "NotFound", f'namespaces "{ns}" not found',
                                             {"name": ns, "kind": "namespaces"}))
            return
        self._reply(handler, 200, {"kind": "Namespace", "apiVersion": "v1",
                                   "metadata": {"name": ns, "uid": str(uuid.uuid4()), "resourceVersion": "1",
                                                "labels": {"kubernetes.io/metadata.name": ns, **labels}},
                                   "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})

    def _list_pods(self, handler: BaseHTTPRequestHandler, ns: str | None) -> None:
        with self.lock:
            items = [copy.deepcopy(pod) for (pod_ns, _), pod in self.pods.items() if ns in (None, pod_ns)]
            version = str(self.pod_history[-1][0] if self.pod_history else 1)
        self._reply(handler, 200, {"kind": "PodList", "apiVersion": "v1",
                                   "metadata": {"resourceVersion": version}, "items": items})

    def _watch_pods(self, handler: BaseHTTPRequestHandler, ns: str | None, query: dict[str, list[str]]) -> None:
        since = int(query.get("resourceVersion", ["0"])[0] or 0)
        deadline = time.monotonic() + min(float(query.get("timeoutSeconds", ["30"])[0]), 30.0)
        with self.lock:
            self.watches += 1
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()

        def chunk(data: bytes) -> None:
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            handler.wfile.flush()

        def send(kind: str, obj: dict[str, Any]) -> None:
            chunk(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

        try:
            while (left := deadline - time.monotonic()) > 0 and not self._stopping:
                with self.changes:
                    fresh = [item for item in self.pod_history if item[0] > since]
                    if not fresh:
                        self.changes.wait(min(left, 0.5))
                        continue
                for version, kind, pod in fresh:
                    since = version
                    if ns in (None, pod["metadata"]["namespace"]):
                        send(kind, pod)
            chunk(b"")  # the end of the stream: the client watches again
        except OSError:
            handler.close_connection = True  # the client went away

    def _token_review(self, handler: BaseHTTPRequestHandler) -> None:
        import jwt

        review = self._body(handler)
        spec = review.get("spec") or {}
        token, audiences = spec.get("token") or "", spec.get("audiences") or []
        with self.lock:
            self.reviews += 1
        status: dict[str, Any] = {"authenticated": False, "user": {}}
        try:
            claims = jwt.decode(token, self.issuer_key.public_key(), algorithms=["RS256"], issuer=self.issuer,
                                audience=audiences or None, options={"verify_aud": bool(audiences)})
            if token in self.revoked:
                raise jwt.InvalidTokenError("service account token has been invalidated")
        except jwt.PyJWTError as exc:
            status["error"] = f"[invalid bearer token, {exc}]"
        else:
            extra: dict[str, list[str]] = {}
            pod = claims.get("kubernetes.io", {}).get("pod")
            if pod:
                extra["authentication.kubernetes.io/pod-name"] = [pod["name"]]
                extra["authentication.kubernetes.io/pod-uid"] = [pod["uid"]]
            namespace = claims["kubernetes.io"]["namespace"]
            status = {"authenticated": True, "audiences": [a for a in claims["aud"] if a in audiences] or claims["aud"],
                      "user": {"username": claims["sub"], "uid": claims["kubernetes.io"]["serviceaccount"]["uid"],
                               "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}",
                                          "system:authenticated"], "extra": extra}}
        review.update({"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
                       "metadata": {"creationTimestamp": None}, "status": status})
        self._reply(handler, 201, review)
