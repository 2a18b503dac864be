"""Prometheus metrics: what the MTA counts and how it is exposed.

Owns the metric names (all ``kubemta_*``), their labels and a registry of its
own.  Counters and histograms are fed from mail events (``on_event`` is a
``mta.obs.log`` subscriber), so no other module imports this one to count;
gauges that describe a state (queue by state, oldest message, sessions,
disk, readiness) are read from their owners when ``/metrics`` is scraped,
through the ``sources`` callables that ``mta.app`` wires in.

Cardinality is bounded on purpose: recipient domains become a label only if
configured in ``metrics.domains`` (else ``other``); rejection reasons are
the reply catalogue's names (else ``CODE_ENHANCED``); listeners and endpoints
come from the configuration.

Failure: an event with missing or odd fields is counted where it can be and
otherwise skipped; a source that raises is logged and left out of that
scrape.  Nothing here raises into mail flow.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mta import replies
from mta.bounce.classify import CATEGORIES

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OUTCOMES = ("delivered", "deferred", "bounced", "expired")
QUEUE_STATES = ("incoming", "deferred", "hold")

# accept-to-delivered: seconds up to the 5-day queue lifetime
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600, 86400,
                   5 * 86400)
ATTEMPT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
LOCAL_ERROR_REASONS = ("content", "dkim")  # as the courier names them; known from the start at 0
SPOOL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

_CATALOGUE = {str(value): name.lower() for name, value in vars(replies).items() if isinstance(value, replies.Reply)}
# The reasons a rejection can carry by name, known from the start at 0 for every listener.
REJECTION_REASONS = tuple(sorted({name.lower() for name, value in vars(replies).items()
                                  if isinstance(value, replies.Reply) and value.code >= 400}))
# Why the webhook sender gives events up (mta.obs.webhooks), known from the start at 0.
WEBHOOK_DROP_REASONS = ("rate", "outbox_full", "write_failed", "expired", "backlog_full")
ESP_KINDS = ("delivered", "bounced", "deferred", "complained", "ignored", "refused")


def reason_label(reply: Any) -> str:
    """A bounded label for a rejection: the catalogue name, else ``CODE_ENHANCED``, else ``other``."""
    text = str(reply or "")
    if text in _CATALOGUE:
        return _CATALOGUE[text]
    parsed = replies.parse(text)
    # Without an enhanced code the text is all there is, and text is unbounded.
    return f"{parsed.code}_{parsed.enhanced}" if parsed is not None and parsed.enhanced else "other"


@dataclass
class QueueSnapshot:
    """The queue as the scheduler sees it at one moment."""

    by_state: dict[str, int] = field(default_factory=dict)
    active: int = 0  # in a delivery round right now
    oldest_created: float | None = None  # unix time of the oldest queued message


@dataclass
class Sources:
    """Callables read at scrape time; any may be left unset."""

    queue: Callable[[], QueueSnapshot] | None = None
    sessions: Callable[[], dict[str, int]] | None = None  # listener -> open sessions
    handshakes: Callable[[], dict[str, int]] | None = None  # listener -> implicit-TLS handshakes under way
    readiness: Callable[[], dict[str, bool]] | None = None  # check -> ok
    disk: Callable[[], dict[str, float]] | None = None  # see mta.obs.disk.DiskGuard.metrics
    spool_commits: Callable[[], tuple[int, int]] | None = None  # (rounds, changes)
    clock: Callable[[], float] = time.time


class _Live(Collector):
    """Gauges computed from their owners when scraped."""

    def __init__(self, sources: Sources) -> None:
        self.sources = sources

    def describe(self) -> Iterable[Metric]:
        return []  # computed per scrape; nothing to check up front

    def collect(self) -> Iterable[Metric]:
        for part in (self._queue, self._sessions, self._readiness, self._disk, self._spool):
            try:
                yield from part()
            except Exception:  # one broken source must not hide the others
                log.exception("metrics source %s failed", part.__name__)

    def _queue(self) -> Iterable[Metric]:
        size = GaugeMetricFamily("kubemta_queue_messages", "Messages in the queue, by spool state", labels=["state"])
        oldest = GaugeMetricFamily("kubemta_queue_oldest_message_age_seconds",
                                   "Age of the oldest message in the queue (0 when empty)")
        active = GaugeMetricFamily("kubemta_queue_active_messages", "Messages in a delivery round right now")
        snap = self.sources.queue() if self.sources.queue else QueueSnapshot()
        for state in sorted(set(QUEUE_STATES) | set(snap.by_state)):
            size.add_metric([state], snap.by_state.get(state, 0))
        age = 0.0 if snap.oldest_created is None else max(0.0, self.sources.clock() - snap.oldest_created)
        oldest.add_metric([], age)
        active.add_metric([], snap.active)
        return [size, oldest, active]

    def _sessions(self) -> Iterable[Metric]:
        family = GaugeMetricFamily("kubemta_sessions_active", "Open SMTP sessions, by listener", labels=["listener"])
        for name, count in sorted((self.sources.sessions() if self.sources.sessions else {}).items()):
            family.add_metric([name], count)
        # Before its handshake ends a connection on an implicit-TLS listener
        # is no session yet, but it holds a slot, a descriptor and memory.
        handshakes = GaugeMetricFamily("kubemta_tls_handshakes_active",
                                       "Connections in an implicit-TLS handshake (not yet sessions), by listener",
                                       labels=["listener"])
        for name, count in sorted((self.sources.handshakes() if self.sources.handshakes else {}).items()):
            handshakes.add_metric([name], count)
        return [family, handshakes]

    def _readiness(self) -> Iterable[Metric]:
        checks = self.sources.readiness() if self.sources.readiness else {}
        ready = GaugeMetricFamily("kubemta_ready", "1 when /readyz would answer 200")
        ready.add_metric([], 1.0 if all(checks.values()) else 0.0)
        each = GaugeMetricFamily("kubemta_readiness_check_ok", "Readiness checks, 1 = passing", labels=["check"])
        for name, ok in sorted(checks.items()):
            each.add_metric([name], 1.0 if ok else 0.0)
        return [ready, each]

    def _disk(self) -> Iterable[Metric]:
        values = self.sources.disk() if self.sources.disk else {}
        help_text = {
            "free_bytes": "Free bytes on the spool filesystem",
            "size_bytes": "Size of the spool filesystem in bytes",
            "reserve_bytes": "Free bytes below which new mail is refused",
            "free_inodes": "Free inodes on the spool filesystem",
            "inodes": "Inodes of the spool filesystem",
            "reserve_inodes": "Free inodes below which new mail is refused",
            "guard_active": "1 while new mail is refused for lack of disk space",
        }
        out = []
        for key, text in help_text.items():
            family = GaugeMetricFamily(f"kubemta_spool_disk_{key}", text)
            if key in values:
                family.add_metric([], values[key])
            out.append(family)
        return out

    def _spool(self) -> Iterable[Metric]:
        rounds, changes = self.sources.spool_commits() if self.sources.spool_commits else (0, 0)
        return [
            CounterMetricFamily("kubemta_spool_commit_rounds", "Group-commit rounds (fsync rounds)", value=rounds),
            CounterMetricFamily("kubemta_spool_commit_changes", "Spool changes made durable", value=changes),
        ]


class Metrics:
    def __init__(self, domains: Sequence[str] = (), listeners: Sequence[str] = (),
                 registry: CollectorRegistry | None = None, webhook_endpoints: Sequence[str] = (),
                 sending_domains: Sequence[str] = (), esp_providers: Sequence[str] = ()) -> None:
        disable_created_metrics()  # the *_created series only add noise to every scrape
        self.registry = registry or CollectorRegistry()
        self.domains = {d.lower() for d in domains}
        self.sending_domains = {d.lower() for d in sending_domains}  # labels of rate counts; others: "other"
        self.sources = Sources()
        r = self.registry
        self.received = Counter("kubemta_messages_received", "Messages offered at DATA, by listener and result",
                                ["listener", "result"], registry=r)
        # The namespace, never the pod or ServiceAccount name: a label with as many values as the cluster has
        # namespaces, not one per pod restart.
        self.workload_messages = Counter("kubemta_workload_messages", "Messages accepted from cluster workloads "
                                         "(ServiceAccount token or pod identity), by namespace", ["namespace"],
                                         registry=r)
        self.complaints = Counter("kubemta_complaints", "Complaints received (ARF reports and ESP events), by the "
                                  "complained-about mail's sending domain and whether they were proven (SPF or "
                                  "DKIM passed, or the provider's signature)", ["sending_domain", "trusted"],
                                  registry=r)
        # The denominators of bounce and complaint rates (the monitoring component's alerts).
        self.sent = Counter("kubemta_sending_domain_sent", "Recipients whose delivery was concluded here (delivered, "
                            "bounced or expired), by the sender's domain", ["sending_domain"], registry=r)
        self.sending_bounces = Counter("kubemta_sending_domain_bounces", "Recipients that bounced, at once or "
                                       "reported later, by the sender's domain and bounce category",
                                       ["sending_domain", "category"], registry=r)
        self.esp_events = Counter("kubemta_esp_events", "Event webhooks of email service providers, by provider "
                                  "and what they said (refused: not proven to come from the provider)",
                                  ["provider", "kind"], registry=r)
        self.feedback_reports = Counter("kubemta_feedback_reports", "Reports taken by feedback listeners, by what "
                                        "they matched", ["result"], registry=r)
        self.rejections = Counter("kubemta_rejections", "Refused commands and connections, by reason",
                                  ["listener", "reason"], registry=r)
        self.attempts = Counter("kubemta_delivery_attempts", "Delivery transactions started, by destination",
                                ["domain"], registry=r)
        self.connect_failures = Counter("kubemta_delivery_connect_failures",
                                        "Next hops that could not be reached", registry=r)
        self.outcomes = Counter("kubemta_delivery_outcomes", "Recipients by delivery outcome and destination",
                                ["domain", "outcome"], registry=r)
        # Bounded labels: six policies, RFC 8460's dozen result types, four outcomes.
        self.tls_policy = Counter("kubemta_delivery_tls_policy", "Recipients by outbound TLS policy, its result "
                                  "and the delivery outcome", ["policy", "result", "outcome"], registry=r)
        self.tls_reports = Counter("kubemta_tls_policy_reports", "Failures MTA-STS testing reported and let "
                                   "through, by result", ["result"], registry=r)
        self.latency = Histogram("kubemta_delivery_latency_seconds", "From accepted to delivered, per recipient",
                                 ["domain"], buckets=LATENCY_BUCKETS, registry=r)
        self.attempt_duration = Histogram("kubemta_delivery_attempt_duration_seconds",
                                          "Duration of one delivery transaction", ["domain"],
                                          buckets=ATTEMPT_BUCKETS, registry=r)
        self.spool_write = Histogram("kubemta_spool_write_duration_seconds",
                                     "Spool writes until durable (fsync included), by operation", ["operation"],
                                     buckets=SPOOL_BUCKETS, registry=r)
        self.bounces = Counter("kubemta_bounces", "Recipients that bounced (refused or expired), by bounce "
                               "category and recipient domain", ["category", "domain"], registry=r)
        self.suppressions = Counter("kubemta_suppressions_added", "Addresses put on the suppression list, by "
                                    "reason and source", ["reason", "source"], registry=r)
        self.dsn = Counter("kubemta_dsn_queued", "Delivery status notifications queued (failure, delay and relay)",
                           registry=r)
        self.auth_failures = Counter("kubemta_auth_failures", "Failed AUTH attempts, by listener", ["listener"],
                                     registry=r)
        self.auth_throttled = Counter("kubemta_auth_throttled", "AUTH refused by brute-force throttling, by scope "
                                      "(client address or user name)", ["scope"], registry=r)
        self.dkim_failures = Counter("kubemta_dkim_sign_failures", "Messages that could not be DKIM-signed",
                                     registry=r)
        self.local_errors = Counter("kubemta_local_errors", "Deliveries that failed here, not at the receiver, "
                                    "by cause (content, dkim)", ["reason"], registry=r)
        for reason in LOCAL_ERROR_REASONS:
            self.local_errors.labels(reason)
        self.selfcheck = Gauge("kubemta_selfcheck_ok", "Deliverability self-checks, 1 = passing", ["check"],
                               registry=r)
        self.events = Counter("kubemta_events", "Mail events logged, by name", ["event"], registry=r)
        self.webhook_deliveries = Counter("kubemta_webhook_deliveries", "Webhook events delivered", ["endpoint"],
                                          registry=r)
        self.webhook_failures = Counter("kubemta_webhook_failures", "Failed webhook POSTs (retried later)",
                                        ["endpoint"], registry=r)
        self.webhook_dropped = Counter("kubemta_webhook_dropped", "Webhook events given up, by reason",
                                       ["endpoint", "reason"], registry=r)
        self.webhook_outbox = Gauge("kubemta_webhook_outbox_events", "Webhook events waiting to be sent",
                                    ["endpoint"], registry=r)
        # 1 while the limits store answers (always, for the store in this process); 0 while each pod
        # falls back to its share of every limit (mta.limits.fallback).
        self.limits_store_up = Gauge("kubemta_limits_store_up", "The shared limits store answers (1) or this "
                                     "pod counts its share of the limits alone (0)", registry=r)
        self.limits_store_up.set(1)
        self.route_breaker_open = Gauge("kubemta_route_breaker_open", "A route's circuit breaker is open (1): its "
                                        "mail goes to its fallback", ["route"], registry=r)
        self.registry.register(_Live(self.sources))
        # Series that exist from the start, so rates and alerts see a zero, not nothing.
        for domain in [*sorted(self.domains), "other"]:
            self.attempts.labels(domain)
            for outcome in OUTCOMES:
                self.outcomes.labels(domain, outcome)
            for category in CATEGORIES:
                self.bounces.labels(category, domain)
        for sending in [*sorted(self.sending_domains), "other"]:
            self.sent.labels(sending)
            for category in CATEGORIES:
                self.sending_bounces.labels(sending, category)
            for trusted in ("true", "false"):
                self.complaints.labels(sending, trusted)
        for provider in esp_providers:
            for kind in ESP_KINDS:
                self.esp_events.labels(provider, kind)
        for listener in listeners:
            for result in ("accepted", "rejected"):
                self.received.labels(listener, result)
            self.auth_failures.labels(listener)
            for reason in REJECTION_REASONS:
                self.rejections.labels(listener, reason)
        for endpoint in webhook_endpoints:
            self.webhook_deliveries.labels(endpoint)
            self.webhook_failures.labels(endpoint)
            self.webhook_outbox.labels(endpoint)
            for reason in WEBHOOK_DROP_REASONS:
                self.webhook_dropped.labels(endpoint, reason)
        for operation in ("store", "save", "remove"):
            self.spool_write.labels(operation)

    # -- labels ------------------------------------------------------------

    def domain_label(self, domain_or_address: Any) -> str:
        domain = str(domain_or_address or "").rpartition("@")[2].strip().lower().rstrip(".]").lstrip("[")
        return domain if domain in self.domains else "other"

    def sending_label(self, fields: dict[str, Any]) -> str:
        """The sending domain an event names (a report's or provider's From), else its envelope sender's."""
        domain = str(fields.get("sending_domain") or str(fields.get("sender") or "").rpartition("@")[2]).lower()
        return domain if domain in self.sending_domains else "other"

    # -- events --------------------------------------------------------------

    def on_event(self, name: str, fields: dict[str, Any]) -> None:
        self.events.labels(name).inc()
        handler = _HANDLERS.get(name)
        if handler is not None:
            handler(self, fields)

    def _received(self, fields: dict[str, Any]) -> None:
        self.received.labels(str(fields.get("listener", "unknown")), "accepted").inc()
        if fields.get("namespace"):
            self.workload_messages.labels(str(fields["namespace"])).inc()

    def _rejected(self, fields: dict[str, Any]) -> None:
        listener = str(fields.get("listener", "unknown"))
        self.rejections.labels(listener, reason_label(fields.get("reply"))).inc()
        if "queue_id" in fields:  # refused at the end of DATA: a message not taken
            self.received.labels(listener, "rejected").inc()

    def _attempt(self, fields: dict[str, Any]) -> None:
        self.attempts.labels(self.domain_label(fields.get("domain"))).inc()

    def _attempt_done(self, fields: dict[str, Any]) -> None:
        duration = _number(fields.get("duration"))
        if duration is not None:
            self.attempt_duration.labels(self.domain_label(fields.get("domain"))).observe(duration)

    def _outcome(self, name: str, fields: dict[str, Any]) -> None:
        domain = self.domain_label(fields.get("recipient"))
        if fields.get("provider"):
            self.esp_events.labels(str(fields["provider"]), name).inc()
        if not fields.get("source"):  # a report or ESP event later: the delivery was counted when it happened
            self.outcomes.labels(domain, name).inc()
            if name != "deferred":
                self.sent.labels(self.sending_label(fields)).inc()
        if fields.get("tls_policy"):
            self.tls_policy.labels(str(fields["tls_policy"]), str(fields.get("tls_policy_result", "ok")), name).inc()
        delay = _number(fields.get("delay"))
        if name == "delivered" and delay is not None:
            self.latency.labels(domain).observe(delay)
        if name in ("bounced", "expired"):
            category = str(fields.get("category") or "other")
            category = category if category in CATEGORIES else "other"
            self.bounces.labels(category, domain).inc()
            if fields.get("trusted") is not False:  # an unproven report is recorded, not believed
                self.sending_bounces.labels(self.sending_label(fields), category).inc()

    def _complained(self, fields: dict[str, Any]) -> None:
        if fields.get("provider"):
            self.esp_events.labels(str(fields["provider"]), "complained").inc()
        else:
            self.feedback_reports.labels("complaint").inc()
        self.complaints.labels(self.sending_label(fields), "true" if fields.get("trusted") else "false").inc()

    def _queued(self, fields: dict[str, Any]) -> None:
        if fields.get("dsn_for"):
            self.dsn.inc()

    def _selfcheck(self, fields: dict[str, Any]) -> None:
        # mta.identity logs ``self_check`` with status pass | warn | fail; a warning
        # (a DNS timeout, say) is not a failure yet.
        check = fields.get("check")
        if check:
            ok = fields.get("status") in ("pass", "warn")
            self.selfcheck.labels(str(check)).set(1.0 if ok else 0.0)

    # -- spool timing ------------------------------------------------------

    def observe_spool_write(self, operation: str, seconds: float) -> None:
        """A spool store, save or remove took ``seconds`` until durable (``Spool.observe``)."""
        self.spool_write.labels(operation).observe(seconds)

    # -- exposition --------------------------------------------------------

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


_HANDLERS: dict[str, Callable[[Metrics, dict[str, Any]], None]] = {
    "received": Metrics._received,
    "rejected": Metrics._rejected,
    "attempt": Metrics._attempt,
    "attempt_done": Metrics._attempt_done,
    "delivered": lambda m, f: m._outcome("delivered", f),
    "complained": lambda m, f: m._complained(f),
    "feedback_unmatched": lambda m, f: m.feedback_reports.labels("unmatched").inc(),
    "feedback_ignored": lambda m, f: m.feedback_reports.labels("ignored").inc(),
    "esp_event_ignored": lambda m, f: m.esp_events.labels(str(f.get("provider")), "ignored").inc(),
    "esp_request_refused": lambda m, f: m.esp_events.labels(str(f.get("provider")), "refused").inc(),
    "deferred": lambda m, f: m._outcome("deferred", f),
    "bounced": lambda m, f: m._outcome("bounced", f),
    "expired": lambda m, f: m._outcome("expired", f),
    "queued": Metrics._queued,
    "connect_failed": lambda m, f: m.connect_failures.inc(),
    "auth_failed": lambda m, f: m.auth_failures.labels(str(f.get("listener", "unknown"))).inc(),
    "auth_throttled": lambda m, f: m.auth_throttled.labels(str(f.get("scope", "unknown"))).inc(),
    "dkim_failed": lambda m, f: m.dkim_failures.inc(),
    "local_error": lambda m, f: m.local_errors.labels(str(f.get("reason") or "other")).inc(),
    "self_check": Metrics._selfcheck,
    "tls_policy_report": lambda m, f: m.tls_reports.labels(str(f.get("tls_policy_result") or "other")).inc(),
    "route_breaker_opened": lambda m, f: m.route_breaker_open.labels(str(f.get("route"))).set(1),
    "route_breaker_closed": lambda m, f: m.route_breaker_open.labels(str(f.get("route"))).set(0),
    "limits_store_down": lambda m, f: m.limits_store_up.set(0),
    "limits_store_up": lambda m, f: m.limits_store_up.set(1),
    "suppression_added": lambda m, f: m.suppressions.labels(str(f.get("reason") or "other"),
                                                            str(f.get("source") or "other")).inc(),
}
