"""The configuration: one typed tree, loaded once at start and validated.

Sources, later ones winning: built-in defaults, a YAML file (``-c FILE`` or
``$MTA_CONFIG``), environment variables ``MTA__SECTION__KEY`` (list items by
index: ``MTA__LISTENERS__0__ADDRESS``; values are parsed as YAML scalars).
Last, this pod's entry of ``identity.pods`` is applied (``mta.identity.pod``).
No other module reads files or the environment for settings.  Parsing
``host:port`` values belongs to ``mta.hostport``; turning a disk reserve
into bytes, to ``mta.obs.disk``.

Failure: ``ConfigError`` whose message names the key (or the environment
variable, or the file) and the reason; ``mta`` prints it and exits 2.
"""

from __future__ import annotations

import datetime as dt
import difflib
import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from mta import domains
from mta.bounce import classify
from mta.delivery import providers
from mta.hostport import parse_host_port
from mta.identity.pod import with_pod_identity

ENV_PREFIX = "MTA__"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_SIZE = re.compile(r"^\s*(\d+)\s*(k|kb|kib|m|mb|mib|g|gb|gib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {None: 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?$")


class ConfigError(Exception):
    """The configuration cannot be used; the message says which key and why."""


def _duration(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m, 1h or 5d")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"{value!r} is not a duration such as 30s, 5m, 1h or 5d")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def _size(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a size such as 1048576, 512K or 25M")
    if isinstance(value, int):
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"{value!r} is not a size such as 1048576, 512K or 25M")
    unit = (match.group(2) or "")[:1].lower() or None
    return int(match.group(1)) * _SIZE_UNITS[unit]


parse_duration = _duration  # for command-line options that take a duration (mta suppress add --expires)
Duration = Annotated[float, BeforeValidator(_duration)]
Size = Annotated[int, BeforeValidator(_size)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _domain_pattern(item: str, *, any_domain: bool = False, mx_hosts: bool = False) -> str:
    """``example.com`` or ``*.example.com``; with the flags also ``*`` or ``mx:<pattern>``.

    Kept in the form names are compared in (``mta.domains.normalise``: a
    Unicode name in its ``xn--`` spelling)."""
    name = item.strip()
    if any_domain and name == "*":
        return name
    prefix = "mx:" if mx_hosts and name.lower().startswith("mx:") else ""
    name = prefix + domains.normalise(name[len(prefix):])
    bare = name.removeprefix("mx:") if mx_hosts else name
    if not _HOSTNAME.match(bare.removeprefix("*.")):
        allowed = "a domain or '*.domain'" + (" or '*'" if any_domain else "") + \
            (", or 'mx:' and an MX host pattern" if mx_hosts else "")
        raise ValueError(f"{item!r} is not {allowed}")
    return name


def _readable_file(value: Path) -> Path:
    if not os.access(value, os.R_OK):
        raise ValueError(f"{value} is not a readable file")
    return value


ReadableFile = Annotated[Path, AfterValidator(_readable_file)]


class TlsConfig(Section):
    """A certificate for STARTTLS / implicit TLS, reloaded when the files change."""

    cert_file: ReadableFile
    key_file: ReadableFile



class AuthConfig(Section):
    # May be left out when service_accounts.enabled: then only ServiceAccount tokens log in.
    credentials_file: Path | None = None
    # Plain-text AUTH only for legacy apps on a trusted network; logged loudly.
    allow_plaintext: bool = False

    @field_validator("credentials_file")
    @classmethod
    def _credentials(cls, value: Path | None) -> Path | None:
        if value is not None and not value.parent.is_dir():
            raise ValueError(f"directory {value.parent} does not exist")
        return value


class ListenerConfig(Section):
    name: str = Field(min_length=1)
    address: str
    # feedback: takes only reports (DSNs, complaints) for feedback.domain (mta.feedback)
    mode: Literal["relay", "submission", "submissions", "feedback"] = "relay"
    trusted_networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = Field(default_factory=list)
    tls: TlsConfig | None = None
    auth: AuthConfig | None = None
    proxy_protocol: bool = False
    # The load balancers allowed to send a PROXY header.  Anyone else could
    # claim any client address with one, a trusted one included.
    proxy_sources: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = Field(default_factory=list,
                                                                              validate_default=True)
    # Clients that do not AUTH are identified by their pod (mta.k8s.pods): the
    # source IP must be the pod's own, unchanged (no SNAT on the way).
    identify_pods: bool = False

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        parse_host_port(value)
        return value

    @field_validator("proxy_sources")
    @classmethod
    def _proxy_sources(cls, value: list[Any], info: ValidationInfo) -> list[Any]:
        proxy = info.data.get("proxy_protocol", False)
        if proxy and not value:
            raise ValueError("required when proxy_protocol is on: the load balancers' networks "
                             "(anyone else could claim any client address in a PROXY header)")
        if value and not proxy:
            raise ValueError("set, but proxy_protocol is off")
        if proxy and info.data.get("mode") == "submissions":
            # The header would come before the TLS handshake, which starts at the first byte here.
            raise ValueError("proxy_protocol is not supported with mode 'submissions' (implicit TLS)")
        return value

    @model_validator(mode="after")
    def _tls_for_submissions(self) -> ListenerConfig:
        if self.mode == "submissions" and self.tls is None:
            raise ValueError("mode 'submissions' (implicit TLS) needs tls.cert_file and tls.key_file")
        return self

    @property
    def host_port(self) -> tuple[str, int]:
        return parse_host_port(self.address)


class SpoolConfig(Section):
    path: Path = Path("./var/spool")
    # How a commit round reaches the disk: one syncfs of the spool's
    # filesystem (best on a volume of its own), or an fsync per file.
    sync: Literal["syncfs", "fsync"] = "syncfs"


class DnsConfig(Section):
    nameservers: list[str] = Field(default_factory=list)
    timeout: Duration = 5.0  # per query try; a query gives up after twice this
    # Every lookup of one delivery attempt (MX, then the hosts' addresses) together.
    attempt_timeout: Duration = Field(30.0, gt=0)
    # The nameservers validate DNSSEC and the path to them is trusted (a
    # node-local or in-pod resolver): their AD bit is believed, which DANE needs.
    dnssec: bool = False

    @field_validator("nameservers")
    @classmethod
    def _nameservers(cls, value: list[str]) -> list[str]:
        for item in value:
            host, _ = parse_host_port(item, 53)
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise ValueError(f"{item!r}: a nameserver must be an IP address (host or host:port)") from None
        return value

    @property
    def servers(self) -> list[tuple[str, int]]:
        return [parse_host_port(item, 53) for item in self.nameservers]


# Outbound TLS levels, weakest last (Postfix's smtp_tls_security_level): dane needs TLSA records,
# verify a certificate for the MX name from the roots, encrypt any TLS, may TLS when offered.
TlsLevel = Literal["dane", "verify", "encrypt", "may", "none"]


class DeliveryConfig(Section):
    port: int = Field(25, gt=0, lt=65536)
    source_address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    connect_timeout: Duration = 30.0
    command_timeout: Duration = 120.0
    max_concurrency: int = Field(100, ge=1)
    max_per_destination: int = Field(10, ge=1)
    max_messages_per_connection: int = Field(100, ge=1)
    max_mx_hosts: int = Field(10, ge=1)  # MX hosts looked up per attempt, best first
    max_mx_addresses: int = Field(20, ge=1)  # addresses tried per attempt
    # Non-global addresses (loopback, RFC 1918, link-local, ...) direct delivery may connect to.
    allowed_networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = Field(default_factory=list)
    # Outbound TLS for direct delivery (mta.delivery.tlspolicy); tls_policy rules override per domain.
    tls_level: TlsLevel = "may"
    # A domain whose MX offered STARTTLS is sent over TLS only, this long after it last did (0: never).
    remember_starttls: Duration = 30 * 86400.0
    mta_sts: bool = True  # look up and apply MTA-STS policies (RFC 8461)
    dane: bool = True  # apply DANE TLSA records (RFC 7672); needs dns.dnssec
    tls_ca_file: ReadableFile | None = None  # roots for level verify and MTA-STS; default: system roots
    mta_sts_port: int = Field(443, gt=0, lt=65536)  # where mta-sts.<domain> serves its policy


_TIME_OF_DAY = re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]$")


class TlsReportsConfig(Section):
    """TLS-RPT (RFC 8460): daily reports of direct delivery's TLS sessions to the domains that ask for them."""

    enabled: bool = True  # count sessions and send the reports
    organization_name: str | None = None  # organization-name in the reports; default: hostname
    contact_info: str | None = None  # contact-info; default: postmaster@hostname
    sender: str | None = None  # From and envelope sender of mailed reports; default: tls-reports@hostname
    send_at: str = "01:00"  # UTC time of day the previous days' reports go out
    timeout: Duration = 30.0  # one HTTPS POST
    keep_days: int = Field(14, ge=1, le=366)  # days of counts kept; unsent days are caught up within them

    @field_validator("send_at")
    @classmethod
    def _time_of_day(cls, value: str) -> str:
        if not _TIME_OF_DAY.match(value):
            raise ValueError(f"{value!r} is not a time of day HH:MM (UTC)")
        return value

    @field_validator("sender")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None and (value.count("@") != 1 or not all(value.split("@"))):
            raise ValueError(f"{value!r} is not a mail address")
        return value


class TlsPolicyRule(Section):
    """``tls_policy`` entries: recipient domains ("example.com", "*.bank.example") and their TLS level."""

    match: list[str] = Field(min_length=1)
    level: TlsLevel

    @field_validator("match")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        return [_domain_pattern(item) for item in value]


class QueueConfig(Section):
    retry_initial: Duration = 300.0
    retry_max: Duration = 3600.0
    retry_jitter: float = Field(0.2, ge=0, lt=1)
    lifetime: Duration = 5 * 86400.0
    bounce_lifetime: Duration = 5 * 86400.0
    # Recipients that asked NOTIFY=DELAY hear once that their mail is still
    # queued after this long (Postfix's delay_warning_time); 0: never.
    delay_warning: Duration = 4 * 3600.0

    @model_validator(mode="after")
    def _order(self) -> QueueConfig:
        if self.retry_initial <= 0:
            raise ValueError("retry_initial must be positive")
        if self.retry_max < self.retry_initial:
            raise ValueError("retry_max must not be shorter than retry_initial")
        return self


class BreakerConfig(Section):
    """When a route counts as down (``mta.scheduler.breaker``): over the last ``window``, at least
    ``min_attempts`` attempts of which ``failure_ratio`` or more failed; then its mail goes to
    its fallback for ``cooldown``, after which one attempt probes it."""

    failure_ratio: float = Field(0.5, gt=0, le=1)
    min_attempts: int = Field(5, ge=1)
    window: Duration = Field(120.0, gt=0)
    cooldown: Duration = Field(60.0, gt=0)


class RouteConfig(Section):
    # Named: it can be another route's fallback, and names its breaker in events and metrics.
    name: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    # Empty only for a named route that is another route's fallback and nothing more.
    domains: list[str] = Field(default_factory=list)
    # Where its mail goes while its breaker is open, in order: route names, or "direct" (the
    # recipients' MX hosts, only for mail whose sender's domain has a DKIM key in dkim.keys).
    fallback: list[str] = Field(default_factory=list)
    breaker: BreakerConfig = BreakerConfig()
    # An email service provider's preset (mta.delivery.providers) fills in the keys below the
    # route leaves out: relay (from region where the provider has regions), tls, the login's
    # user name, max_message_size and throttle_texts.
    provider: str | None = None
    region: str | None = None
    relay: str
    tls: Literal["starttls", "implicit", "opportunistic", "none"] = "starttls"
    tls_verify: bool = True
    ca_file: ReadableFile | None = None
    # "user:password" on the first line; or the key alone, then the user name is auth_user
    # (or, without one, the key itself: Postmark's server-token convention).
    auth_file: ReadableFile | None = None
    auth_user: str | None = Field(None, min_length=1)
    # Larger messages are refused before connecting (the provider would refuse them anyway).
    max_message_size: Size | None = None
    # Replies whose text holds one of these mean "slow down", whatever their code.
    throttle_texts: list[str] = Field(default_factory=list)
    # The provider's sending quota, enforced before sending: a burst waits, it is never bounced.
    messages_per_second: int | None = Field(None, ge=1)
    messages_per_minute: int | None = Field(None, ge=1)
    messages_per_day: int | None = Field(None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, value: Any) -> Any:
        if isinstance(value, dict):
            if value.get("provider") is None and value.get("region") is not None:
                raise ValueError("region: only a route with a provider has a region")
            if value.get("provider") is None and value.get("relay") is None:
                raise ValueError("relay: a route needs relay (host:port) or provider")
            return providers.resolve(value)
        return value

    @field_validator("domains")
    @classmethod
    def _domains(cls, value: list[str]) -> list[str]:
        return [_domain_pattern(item, any_domain=True) for item in value]

    @field_validator("relay")
    @classmethod
    def _relay(cls, value: str) -> str:
        parse_host_port(value, 25)
        return value


    @property
    def relay_host_port(self) -> tuple[str, int]:
        return parse_host_port(self.relay, 465 if self.tls == "implicit" else 25)

    @property
    def label(self) -> str:
        """What events and metrics call it: its name, else its relay."""
        return self.name or self.relay


class LimitsStoreConfig(Section):
    """Where the deployment-wide counters live (``mta.limits``): null url, in this process."""

    # redis://host:6379/0, rediss://host:6380/0 (TLS, verified against ca_file or the system CAs), unix:///path
    url: str | None = None
    password_file: ReadableFile | None = None  # a mounted Secret; the password is not put in the config
    ca_file: ReadableFile | None = None
    key_prefix: str = Field("kubemta", pattern=r"^[A-Za-z0-9._-]{1,64}$")
    timeout: Duration = Field(0.5, gt=0)  # per command: a hanging store costs at most this
    retry: Duration = Field(5.0, gt=0)  # while unreachable, ask again this often
    lease_ttl: Duration = Field(30.0, ge=3)  # a connection slot of a dead pod comes back after this
    # While the store is unreachable every pod keeps limit / replicas; default: the
    # StatefulSet's spec.replicas where the Kubernetes API is there, else 1.
    replicas: int | None = Field(None, ge=1)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^(redis|rediss|unix)://[^\s]+$", value):
            raise ValueError(f"{value!r} is not a redis://, rediss:// or unix:// URL")
        return value

    @model_validator(mode="after")
    def _store_options(self) -> LimitsStoreConfig:
        if self.url is None and (self.password_file or self.ca_file):
            raise ValueError("password_file and ca_file need url")
        if self.ca_file is not None and not (self.url or "").startswith("rediss://"):
            raise ValueError("ca_file needs a rediss:// url (TLS)")
        return self


class LimitsConfig(Section):
    max_message_size: Size = 25 * 1024 * 1024
    max_recipients: int = Field(1000, ge=100)  # RFC 5321 §4.5.3.1.8: at least 100
    # CRLF included; RFC 5321 §4.5.3.1.6 says 1000, legacy apps send longer
    # lines, which are accepted and re-encoded before delivery (mta.content).
    max_line_length: int = Field(1024 * 1024, ge=1000)
    # DATA held in memory by all sessions of a process together (452 4.3.1
    # beyond it); by default twice max_message_size (``data_in_flight``).
    max_data_in_flight: Size | None = None
    max_hops: int = Field(50, ge=1)  # Received: fields a message may already carry (a loop beyond)
    max_command_length: int = Field(512, ge=512)  # RFC 5321 §4.5.3.1.4
    session_timeout: Duration = 300.0  # per command (RFC 5321 §4.5.3.2.7)
    data_timeout: Duration = 600.0  # the whole DATA phase: a floor on the transfer rate
    max_connections: int = Field(1000, ge=1)
    max_connections_per_ip: int = Field(50, ge=1)
    # Of max_connections, slots only clients in a listener's trusted_networks
    # may take; by default a tenth of max_connections, at most 50 (``reserved``).
    reserved_connections: int | None = Field(None, ge=0)
    max_errors: int = Field(10, ge=1)  # bad commands per session before 421
    max_junk_commands: int = Field(50, ge=1)  # NOOP, RSET, VRFY, HELP, EXPN per session
    max_auth_failures: int = Field(5, ge=1)  # per client IP and per user name, in the window
    auth_failure_window: Duration = 900.0
    auth_failure_delay: Duration = 1.0  # answer each failed AUTH this late
    bare_line_endings: Literal["replace", "reject"] = "replace"
    # Without MAIL, RCPT, DATA, AUTH or STARTTLS; NOOP, RSET and EHLO do not keep a session.
    session_idle_timeout: Duration = Field(300.0, gt=0)
    session_lifetime: Duration = Field(3600.0, gt=0)  # then 421 (a DATA transfer under way may finish)
    tls_handshake_timeout: Duration = Field(10.0, gt=0)  # implicit TLS and STARTTLS
    max_tls_handshakes: int = Field(100, ge=1)  # in progress at once, per listener (implicit TLS)
    max_tls_handshakes_per_ip: int = Field(10, ge=1)
    store: LimitsStoreConfig = LimitsStoreConfig()

    @model_validator(mode="after")
    def _line_within_message(self) -> LimitsConfig:
        # The default follows a smaller max_message_size; a value given may not pass it.
        if "max_line_length" in self.model_fields_set and self.max_line_length > self.max_message_size:
            raise ValueError(f"max_line_length: must not be above max_message_size ({self.max_message_size})")
        if self.max_data_in_flight is not None and self.max_data_in_flight < self.max_message_size:
            raise ValueError(f"max_data_in_flight: must be at least max_message_size ({self.max_message_size}),"
                             " or no message of that size could be received")
        return self

    @property
    def data_in_flight(self) -> int:
        return self.max_data_in_flight or 2 * self.max_message_size

    @property
    def line_limit(self) -> int:
        """The longest line DATA may hold, CRLF included: never beyond the message size."""
        return min(self.max_line_length, self.max_message_size)

    @field_validator("reserved_connections")
    @classmethod
    def _reserve_below_total(cls, value: int | None, info: ValidationInfo) -> int | None:
        total = info.data.get("max_connections")
        if value is not None and total is not None and value >= total:
            raise ValueError(f"must be below max_connections ({total}): untrusted clients need slots too")
        return value

    @property
    def reserved(self) -> int:
        """The slots of each listener kept for its trusted networks."""
        if self.reserved_connections is not None:
            return self.reserved_connections
        return min(50, self.max_connections // 10)


class AccountPolicy(Section):
    """What one authenticated client may do (``*`` = anything)."""

    senders: list[str] = Field(default_factory=lambda: ["*"])  # envelope senders: address, @domain or *
    from_addresses: list[str] = Field(default_factory=lambda: ["*"])  # From: header, same patterns
    max_message_size: Size | None = None
    max_recipients: int | None = Field(None, ge=1)
    messages_per_minute: int | None = Field(None, ge=1)
    recipients_per_day: int | None = Field(None, ge=1)

    @field_validator("senders", "from_addresses")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        for item in value:
            if item != "*" and "@" not in item:
                raise ValueError(f"{item!r}: use an address, '@domain' or '*'")
        return [item.lower() for item in value]


_K8S_NAME = r"[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?"
_WORKLOAD_KEY = re.compile(rf"^{_K8S_NAME}/(?:{_K8S_NAME}|\*)$")


class WorkloadSelector(Section):
    """A policy for the workloads whose namespace (and, identified by pod, whose pod) carry these labels."""

    namespace_labels: dict[str, str] = Field(default_factory=dict)
    pod_labels: dict[str, str] = Field(default_factory=dict)  # only pods identified by IP have them
    policy: AccountPolicy

    @model_validator(mode="after")
    def _something(self) -> WorkloadSelector:
        if not self.namespace_labels and not self.pod_labels:
            raise ValueError("name namespace_labels or pod_labels (a selector of nothing would match every workload)")
        return self


class AccountsConfig(Section):
    default: AccountPolicy = AccountPolicy()
    users: dict[str, AccountPolicy] = Field(default_factory=dict)
    # Cluster workloads (mta.policy.workloads): "namespace/serviceaccount" or
    # "namespace/*"; then the selectors, first match; then workload_default.
    workloads: dict[str, AccountPolicy] = Field(default_factory=dict)
    workload_selectors: list[WorkloadSelector] = Field(default_factory=list)
    workload_default: AccountPolicy | None = None  # None: a workload with no entry may not send

    @field_validator("workloads")
    @classmethod
    def _workload_keys(cls, value: dict[str, AccountPolicy]) -> dict[str, AccountPolicy]:
        for key in value:
            if not _WORKLOAD_KEY.match(key):
                raise ValueError(f"{key!r}: use 'namespace/serviceaccount' or 'namespace/*'")
        return value

    def policy(self, user: str) -> AccountPolicy:
        return self.users.get(user, self.default)


DKIM_SELECTOR = r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,62})$"


def dkim_domain(value: str) -> str:
    """A signing domain (``d=``) in its compared form; ``ValueError`` when it is not a domain name."""
    name = domains.normalise(value)
    if not _HOSTNAME.match(name) or "." not in name:
        raise ValueError(f"{value!r} is not a domain")
    return name


class DkimKeyConfig(Section):
    domain: str
    selector: str = Field(pattern=DKIM_SELECTOR)
    key_file: ReadableFile

    @field_validator("domain")
    @classmethod
    def _domain(cls, value: str) -> str:
        return dkim_domain(value)



class DkimConfig(Section):
    keys: list[DkimKeyConfig] = Field(default_factory=list)
    fallback_domain: str | None = None  # signs mail whose From: domain has no key

    @model_validator(mode="after")
    def _fallback_has_keys(self) -> DkimConfig:
        if self.fallback_domain and domains.normalise(self.fallback_domain) not in {k.domain for k in self.keys}:
            raise ValueError(f"fallback_domain {self.fallback_domain!r} has no key in dkim.keys")
        pairs = [(k.domain, k.selector) for k in self.keys]
        if len(set(pairs)) != len(pairs):
            raise ValueError("a (domain, selector) pair appears twice in dkim.keys")
        return self


class PodEgress(Section):
    source_address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    hostname: str | None = None
    # False where the egress IP is applied outside the pod (an egress gateway's
    # SNAT): it is then checked (PTR, SPF, blocklists) but not bound.
    bind: bool = True

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, value: str | None) -> str | None:
        if value is not None and (not _HOSTNAME.match(value) or "." not in value.strip(".")):
            raise ValueError(f"{value!r} is not a fully qualified host name")
        return value.rstrip(".") if value else value


class IdentityConfig(Section):
    """Who this pod is on the internet, and the checks that it looks right."""

    # Filled from $POD_NAME (or the host name) when not set.
    pod_name: str | None = None
    pods: dict[str, PodEgress] = Field(default_factory=dict)
    enforce: bool = False  # a failing check makes the pod unready and pauses delivery
    check_interval: Duration = 300.0
    dnsbl_zones: list[str] = Field(default_factory=list)
    sending_domains: list[str] = Field(default_factory=list)  # besides the DKIM domains
    probe: str | None = None  # host:port that must be reachable on TCP 25 from the egress address
    # host[:port] (default port 443) mta doctor opens a verified TLS connection to, to show this pod can
    # fetch MTA-STS policies and post TLS-RPT reports over https; null: not checked.
    https_probe: str | None = None
    # The address receivers see; filled from this pod's entry or delivery.source_address.
    egress_address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None


class ShapingRule(Section):
    # Recipient domains ("gmail.com", "*.example.com") or MX hosts ("mx:*.google.com").
    match: list[str] = Field(min_length=1)
    max_connections: int | None = Field(None, ge=1)
    messages_per_connection: int | None = Field(None, ge=1)
    messages_per_minute: int | None = Field(None, ge=1)

    @field_validator("match")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        return [_domain_pattern(item, mx_hosts=True) for item in value]


class WarmupSchedule(Section):
    """A new egress address's daily caps: ``days[0]`` on ``start`` (UTC), ``days[1]`` the day
    after, and so on; none once the list ends.  With ``match``, only mail to those
    recipient domains (or ``mx:`` hosts) counts and waits: one mailbox provider's schedule."""

    start: dt.date
    days: list[int] = Field(min_length=1)
    match: list[str] = Field(default_factory=list)

    @field_validator("days")
    @classmethod
    def _days(cls, value: list[int]) -> list[int]:
        if any(cap < 1 for cap in value):
            raise ValueError("every day's cap is at least 1")
        return value

    @field_validator("match")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        return [_domain_pattern(item, mx_hosts=True) for item in value]

    def cap(self, today: dt.date) -> int | None:
        """Today's cap; None before ``start`` (not warming up yet) and after the last day."""
        day = (today - self.start).days
        return self.days[day] if 0 <= day < len(self.days) else None


class ShapingConfig(Section):
    rules: list[ShapingRule] = Field(default_factory=list)
    daily_cap: int | None = Field(None, ge=1)  # messages a day from this pod's egress address (IP warm-up)
    warmup: list[WarmupSchedule] = Field(default_factory=list)

    @field_validator("warmup")
    @classmethod
    def _one_overall(cls, value: list[WarmupSchedule]) -> list[WarmupSchedule]:
        if sum(1 for schedule in value if not schedule.match) > 1:
            raise ValueError("at most one schedule without match (the overall one)")
        return value


class HttpConfig(Section):
    address: str = "127.0.0.1:8080"

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        parse_host_port(value)
        return value

    @property
    def host_port(self) -> tuple[str, int]:
        return parse_host_port(self.address)


class HttpApiConfig(Section):
    """The HTTP send API (``mta.api``): off until ``address`` is set."""

    address: str | None = None  # e.g. 0.0.0.0:8443
    tls: TlsConfig | None = None  # without it the API speaks plain HTTP (behind a mesh or on loopback)
    # ``account:$scrypt$...`` lines, the credentials file's format: the key is
    # ``<account>.<secret>`` and the file holds the secret's hash (``mta api-key add``).
    # May be left out when service_accounts.enabled: then only ServiceAccount tokens are taken.
    keys_file: Path | None = None
    # A request body larger than this is refused (413) before it is read;
    # None: limits.max_message_size with room for base64 and JSON.
    max_request_size: Size | None = None

    @field_validator("address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None:
            parse_host_port(value)
        return value

    @field_validator("keys_file")
    @classmethod
    def _keys_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.parent.is_dir():
            raise ValueError(f"directory {value.parent} does not exist")
        return value

    @property
    def host_port(self) -> tuple[str, int]:
        assert self.address is not None
        return parse_host_port(self.address)


class ShutdownConfig(Section):
    # Keep below the pod's terminationGracePeriodSeconds.
    timeout: Duration = 25.0


class LogConfig(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"  # json: one object per line on stdout


# -- observability: metrics, disk guard, webhooks ----------------------------

_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


def _reserve(value: Any) -> str | int:
    """A reserve is an absolute amount or a share of the filesystem ("5%")."""
    if isinstance(value, str) and "%" in value:
        match = _PERCENT.match(value)
        if not match or float(match.group(1)) >= 100:
            raise ValueError(f"{value!r} is not a percentage below 100%")
        return value.strip()
    return _size(value)


Reserve = Annotated[str | int, BeforeValidator(_reserve)]


class MetricsConfig(Section):
    """Prometheus metrics on ``/metrics`` of ``http.address``."""

    enabled: bool = True
    # Recipient domains that get a label of their own; every other one is "other".
    domains: list[str] = Field(default_factory=list, max_length=50)

    @field_validator("domains")
    @classmethod
    def _domains(cls, value: list[str]) -> list[str]:
        out = []
        for item in value:
            name = item.strip().lower().rstrip(".")
            if not _HOSTNAME.match(name):
                raise ValueError(f"{item!r} is not a domain")
            out.append(name)
        return out


class DiskConfig(Section):
    """Below these free amounts on the spool filesystem new mail gets 452 4.3.1."""

    min_free: Reserve = "5%"  # bytes ("500M") or a share of the filesystem ("5%")
    min_free_inodes: Reserve = "5%"  # inodes (10000) or a share ("5%")
    check_interval: Duration = 1.0


WEBHOOK_EVENTS = ("delivered", "deferred", "bounced", "expired", "rejected", "complained")
_ENDPOINT_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


class WebhookEndpoint(Section):
    name: str  # also the name of its outbox folder
    url: str
    secret_file: ReadableFile  # the HMAC-SHA256 key: the file's first line
    # Not "rejected" by default: any client can cause those (and they are rate-limited).
    events: list[Literal["delivered", "deferred", "bounced", "expired", "rejected", "complained"]] = Field(
        default_factory=lambda: [name for name in WEBHOOK_EVENTS if name != "rejected"], min_length=1)
    timeout: Duration = 10.0

    @field_validator("secret_file")
    @classmethod
    def _secret(cls, value: Path) -> Path:
        lines = value.read_text(errors="replace").splitlines()
        if not lines or not lines[0].strip():
            raise ValueError(f"{value}: the first line, the HMAC key, is empty")
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _ENDPOINT_NAME.match(value):
            raise ValueError(f"{value!r}: use lower-case letters, digits and '-'")
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"{value!r} is not an http:// or https:// URL")
        return value



class WebhooksConfig(Section):
    """Delivery events POSTed to HTTP endpoints, kept in an outbox beside the spool."""

    endpoints: list[WebhookEndpoint] = Field(default_factory=list)
    retry_initial: Duration = 5.0  # doubles after each failed POST ...
    retry_max: Duration = 600.0  # ... up to this
    max_age: Duration = 86400.0  # an event not delivered by then is dropped and counted
    max_outbox: int = Field(100_000, ge=1)  # events waiting per endpoint; past it new ones are dropped

    @model_validator(mode="after")
    def _check(self) -> WebhooksConfig:
        names = [item.name for item in self.endpoints]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"webhook endpoint names must be unique: {', '.join(dupes)}")
        if self.retry_initial <= 0 or self.retry_max < self.retry_initial:
            raise ValueError("need 0 < retry_initial <= retry_max")
        return self


class KubernetesConfig(Section):
    """Where this pod is and how to reach the API server (``mta.k8s``)."""

    enabled: bool = False
    pod_name: str | None = None  # default: the host name (a StatefulSet pod's name)
    pod_uid: str | None = None  # for Events; from the downward API
    namespace: str = "default"
    statefulset: str | None = None  # default: the pod name without its "-<ordinal>"
    api_url: str | None = None  # default: the in-cluster service account configuration
    token_file: ReadableFile | None = None  # with api_url: a bearer token
    ca_file: ReadableFile | None = None  # with api_url: the API server's CA bundle
    timeout: Duration = 5.0



class EspSendgridConfig(Section):
    # The Signed Event Webhook's verification key: base64 of the DER key, as the console shows it, or PEM.
    public_key_file: ReadableFile
    max_age: Duration = Field(600.0, gt=0)  # a signed timestamp older than this is a replay


class EspMailgunConfig(Section):
    signing_key_file: ReadableFile  # the HTTP webhook signing key
    max_age: Duration = Field(600.0, gt=0)


class EspSesConfig(Section):
    """Amazon SES notifications through an SNS topic (HTTPS subscription, raw message delivery off)."""

    topic_arns: list[str] = Field(min_length=1)  # only these topics are taken
    # Signing certificates are fetched over HTTPS only from hosts matching this.
    cert_hosts: str = r"^sns\.[a-z0-9-]+\.amazonaws\.com(\.cn)?$"
    ca_file: ReadableFile | None = None  # for that HTTPS; default, the system's CAs
    confirm_subscriptions: bool = True  # visit the SubscribeURL of a signed confirmation for a listed topic

    @field_validator("topic_arns")
    @classmethod
    def _arns(cls, value: list[str]) -> list[str]:
        for arn in value:
            if not re.match(r"^arn:aws[a-z-]*:sns:[a-z0-9-]+:\d{12}:[A-Za-z0-9_-]{1,256}$", arn):
                raise ValueError(f"{arn!r} is not an SNS topic ARN (arn:aws:sns:REGION:ACCOUNT:NAME)")
        return value

    @field_validator("cert_hosts")
    @classmethod
    def _hosts(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"{value!r} is not a regular expression: {exc}") from None
        return value


class EspPostmarkConfig(Section):
    # "user:password" on the first line: the basic-auth credentials put in the webhook's URL.
    credentials_file: ReadableFile


class EspEventsConfig(Section):
    """Event webhooks of email service providers, on the HTTP API: ``POST /v1/events/<provider>``."""

    sendgrid: EspSendgridConfig | None = None
    mailgun: EspMailgunConfig | None = None
    ses: EspSesConfig | None = None
    postmark: EspPostmarkConfig | None = None

    @property
    def providers(self) -> list[str]:
        return [name for name in ("sendgrid", "mailgun", "ses", "postmark") if getattr(self, name) is not None]


class FeedbackConfig(Section):
    """Reports that come back later (``mta.feedback``): signed VERP return paths and the feedback listener."""

    # The return-path domain: its MX points at a listener with mode feedback.  None: no VERP, no reports.
    domain: str | None = None
    secret_file: ReadableFile | None = None  # the key that signs return paths; the same on every pod
    esp: EspEventsConfig = EspEventsConfig()  # what providers a smart-host route relays through report

    @field_validator("domain")
    @classmethod
    def _domain(cls, value: str | None) -> str | None:
        if value is not None and (not _HOSTNAME.match(value) or "." not in value.strip(".")):
            raise ValueError(f"{value!r} is not a domain name")
        return value.lower().rstrip(".") if value is not None else None


class ServiceAccountsConfig(Section):
    """Workloads proving who they are with ServiceAccount tokens (``mta.auth.workload``)."""

    enabled: bool = False
    audience: str = Field("kubemta", min_length=1)  # the projected token's audience
    # tokenreview: the API server says (revocation of a bound token is seen);
    # jwks: checked here against the issuer's keys (no API call per token).
    verify: Literal["tokenreview", "jwks"] = "tokenreview"
    issuer: str = "https://kubernetes.default.svc.cluster.local"  # jwks: the iss tokens must carry
    jwks_url: str | None = None  # jwks: default, the issuer's OIDC discovery document names it
    ca_file: ReadableFile | None = None  # jwks: the CA of the issuer's HTTPS; default, the system's
    token_file: ReadableFile | None = None  # jwks: a bearer token for the key fetch (the pod's own)
    # A token checked is trusted until it expires, but never longer than this.
    cache_ttl: Duration = 300.0
    cache_size: int = Field(10_000, ge=1)
    # identify_pods listeners: which namespaces' pods to watch (empty: all, a ClusterRole).
    pod_namespaces: list[str] = Field(default_factory=list)


class DrainTlsConfig(Section):
    """TLS for the handoff: the endpoint serves ``cert_file``, senders verify it with ``ca_file``."""

    cert_file: ReadableFile  # this pod's certificate: served, and shown as a client certificate to peers
    key_file: ReadableFile
    ca_file: ReadableFile  # the CA bundle a peer's endpoint certificate must chain to
    # When set, the endpoint asks every client for a certificate chaining to these CAs.
    client_ca_file: ReadableFile | None = None
    # The name a peer's certificate must carry; None: the host of its address (drain.peer_address, --to).
    # One fixed name lets a single certificate from a private CA serve every pod in any namespace.
    server_name: str | None = None


class DrainConfig(Section):
    """Pod-to-pod handoff of queued mail on scale-down (``mta.drain``)."""

    listen: str | None = None  # the handoff endpoint, e.g. 0.0.0.0:8025; None: this pod accepts none
    # Shared by all pods; both ends need it.  May be absent (an optional
    # Secret not created yet): the pod then runs without handoffs.
    secret_file: Path | None = None
    # Where the pod with a given ordinal takes handoffs; {statefulset}, {ordinal}, {namespace}.
    peer_address: str = "{statefulset}-{ordinal}.{statefulset}-headless.{namespace}.svc:8025"
    on_scale_down: bool = True  # drain at SIGTERM when this pod's ordinal is no longer wanted
    timeout: Duration = 60.0  # for the whole drain; keep grace period > shutdown.timeout + this
    # Without it handoffs go as plain HTTP (signed, not encrypted); every pod needs the same setting.
    tls: DrainTlsConfig | None = None

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str | None) -> str | None:
        if value is not None:
            parse_host_port(value)
        return value


    @model_validator(mode="after")
    def _needs_secret(self) -> DrainConfig:
        if self.listen is not None and self.secret_file is None:
            raise ValueError("listen needs secret_file: handoffs are authenticated")
        return self


# -- the feedback loop: bounce categories, the suppression list --------------


class BounceRule(Section):
    """One classification rule: every part given must match (``mta.bounce.classify``)."""

    category: str
    enhanced: str | None = None  # a regular expression for the whole enhanced code: "5\\.7\\.1"
    code: str | None = None  # ... for the basic code: "55[04]"
    text: str | None = None  # searched for in the reply text, case-insensitive

    @field_validator("category")
    @classmethod
    def _category(cls, value: str) -> str:
        if value not in classify.CATEGORIES:
            raise ValueError(f"{value!r} is not one of {', '.join(classify.CATEGORIES)}")
        return value

    @field_validator("code", mode="before")
    @classmethod
    def _code_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value  # code: 550

    @field_validator("enhanced", "code", "text")
    @classmethod
    def _pattern(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"{value!r} is not a regular expression: {exc}") from None
        return value

    @model_validator(mode="after")
    def _something(self) -> BounceRule:
        if self.enhanced is None and self.code is None and self.text is None:
            raise ValueError("a rule needs at least one of enhanced, code, text")
        return self

    def compiled(self) -> classify.Rule:
        return classify.rule(self.category, enhanced=self.enhanced, code=self.code, text=self.text,
                             provider="config")


class BouncesConfig(Section):
    # Tried before the built-in rules, in order; the first match wins.
    rules: list[BounceRule] = Field(default_factory=list)

    def classifier(self) -> classify.Classifier:
        return classify.Classifier(item.compiled() for item in self.rules)


def _never(value: Any) -> Any:
    return None if value in (None, 0, "0", "never") else value


Expiry = Annotated[Duration | None, BeforeValidator(_never)]


class SuppressionExpiry(Section):
    """How long an entry stays, per reason; ``never`` (or 0) keeps it until an operator removes it."""

    invalid_recipient: Expiry = 365 * 86400.0
    invalid_domain: Expiry = 30 * 86400.0  # a domain may come back to life sooner than a mailbox
    complaint: Expiry = None
    manual: Expiry = None


class SuppressionConfig(Section):
    """Recipients not to send to again (``mta.suppression``): SQLite on the spool volume."""

    enabled: bool = True
    path: Path | None = None  # default: suppression.db in spool.path
    # refuse: 550 5.1.1 at RCPT, so the client learns at once; hold: accept, and
    # keep the message on hold for an operator to release or delete.
    action: Literal["refuse", "hold"] = "refuse"
    # What a bounce suppresses: the address for everyone, or only for mail from
    # the same sending domain, or from the same AUTH account.
    scope: Literal["global", "sending_domain", "account"] = "global"
    expiry: SuppressionExpiry = SuppressionExpiry()
    busy_timeout: Duration = Field(5.0, gt=0)  # waiting for another process's write (workers share the file)


class ProbeImapConfig(Section):
    """The mailbox the probe's message must arrive in."""

    address: str  # host:port
    tls: Literal["implicit", "starttls", "none"] = "implicit"
    ca_file: ReadableFile | None = None
    credentials_file: ReadableFile  # "user:password" on the first line (a mounted Secret)
    mailbox: str = "INBOX"

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        parse_host_port(value, 993)
        return value


class ProbeWebhookConfig(Section):
    """Arrival told by the provider: its delivery event webhook POSTs here (it names the message's
    Message-ID, which holds the probe's token)."""

    listen: str  # host:port the probe listens on while it waits
    path: str = Field("/kubemta-probe", pattern=r"^/[A-Za-z0-9/_.-]*$")

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        parse_host_port(value)
        return value


class ProbeConfig(Section):
    """``mta probe``'s file: where to submit a tagged message, where it must arrive, where to report."""

    submit: str  # host:port of a kubemta listener: the Service, as the apps reach it
    submit_tls: Literal["starttls", "implicit", "none"] = "starttls"
    submit_ca_file: ReadableFile | None = None
    submit_credentials_file: ReadableFile | None = None  # "user:password", for a listener with AUTH
    sender: str = Field(pattern=r"^[^@\s]+@[^@\s]+$")
    to: str = Field(pattern=r"^[^@\s]+@[^@\s]+$")
    # Where arrival is seen: the recipient's mailbox over IMAP, or the provider's delivery webhook.
    imap: ProbeImapConfig | None = None
    webhook: ProbeWebhookConfig | None = None
    timeout: Duration = Field(300.0, gt=0)  # from the 250 to the message in the mailbox
    poll: Duration = Field(5.0, gt=0)
    # A Prometheus Pushgateway (http://pushgateway.monitoring:9091); null: printed only.
    pushgateway: str | None = Field(None, pattern=r"^https?://[^\s]+$")
    job: str = Field("kubemta_probe", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    # The grouping label ``probe``: one series per path probed (a route, a provider).
    name: str = Field("default", pattern=r"^[A-Za-z0-9_.-]{1,64}$")

    @field_validator("submit")
    @classmethod
    def _submit(cls, value: str) -> str:
        parse_host_port(value, 587)
        return value

    @model_validator(mode="after")
    def _one_arrival(self) -> ProbeConfig:
        if (self.imap is None) == (self.webhook is None):
            raise ValueError("set one of imap (the mailbox) and webhook (the provider's delivery events)")
        return self


def _default_listeners() -> list[ListenerConfig]:
    return [
        ListenerConfig(
            name="relay",
            address="127.0.0.1:2525",
            mode="relay",
            trusted_networks=[ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")],
        )
    ]


def _default_hostname() -> str:
    name = socket.getfqdn()
    # HELO and Received need a qualified name; a bare container hostname is not.
    return name if "." in name.strip(".") else f"{name}.localdomain"


class Config(Section):
    hostname: str = Field(default_factory=_default_hostname)
    # Receiving processes besides the main one (mta.workers): with N > 0 the
    # listeners without AUTH are served by N workers (SO_REUSEPORT) and the
    # main process delivers.  0: the main process does everything.
    workers: int = Field(0, ge=0, le=64)
    spool: SpoolConfig = SpoolConfig()
    listeners: list[ListenerConfig] = Field(default_factory=_default_listeners)
    dns: DnsConfig = DnsConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    queue: QueueConfig = QueueConfig()
    routes: list[RouteConfig] = Field(default_factory=list)
    limits: LimitsConfig = LimitsConfig()
    accounts: AccountsConfig = AccountsConfig()
    dkim: DkimConfig = DkimConfig()
    identity: IdentityConfig = IdentityConfig()
    shaping: ShapingConfig = ShapingConfig()
    authserv_id: str | None = None  # the name in our Authentication-Results; default: hostname
    http: HttpConfig = HttpConfig()
    http_api: HttpApiConfig = HttpApiConfig()
    shutdown: ShutdownConfig = ShutdownConfig()
    log: LogConfig = LogConfig()
    metrics: MetricsConfig = MetricsConfig()
    disk: DiskConfig = DiskConfig()
    webhooks: WebhooksConfig = WebhooksConfig()
    kubernetes: KubernetesConfig = KubernetesConfig()
    service_accounts: ServiceAccountsConfig = ServiceAccountsConfig()
    drain: DrainConfig = DrainConfig()
    tls_policy: list[TlsPolicyRule] = Field(default_factory=list)
    tls_reports: TlsReportsConfig = TlsReportsConfig()
    bounces: BouncesConfig = BouncesConfig()
    feedback: FeedbackConfig = FeedbackConfig()
    suppression: SuppressionConfig = SuppressionConfig()

    def _check_fallbacks(self) -> None:
        named = [route.name for route in self.routes if route.name]
        if len(set(named)) != len(named):
            raise ValueError("route names must be unique")
        fallbacks = {name for route in self.routes for name in route.fallback}
        for n, route in enumerate(self.routes):
            for name in route.fallback:
                if name != "direct" and name not in named:
                    raise ValueError(f"routes.{n}.fallback: no route is named {name!r} (or say 'direct')")
                if name == route.name:
                    raise ValueError(f"routes.{n}.fallback: a route cannot be its own fallback")
            if len(set(route.fallback)) != len(route.fallback):
                raise ValueError(f"routes.{n}.fallback names a route twice")
            if not route.domains and route.name not in fallbacks:
                raise ValueError(f"routes.{n}.domains: empty, and no route has it as fallback: it would take no mail")

    def _check_feedback(self) -> None:
        if self.feedback.domain is not None and self.feedback.secret_file is None:
            raise ValueError("feedback.secret_file: required with domain: return paths are signed so that nobody "
                             "can forge a bounce")
        if self.feedback.esp.providers and self.http_api.address is None:
            raise ValueError("feedback.esp: provider events are posted to the HTTP API: set http_api.address")
        for n, listener in enumerate(self.listeners):
            if listener.mode != "feedback":
                continue
            if self.feedback.domain is None:
                raise ValueError(f"listeners.{n}.mode: 'feedback' takes reports for feedback.domain: set it")
            if listener.auth is not None or listener.trusted_networks or listener.identify_pods:
                raise ValueError(f"listeners.{n}: a feedback listener relays nothing: no auth, trusted_networks "
                                 "or identify_pods")
            if self.workers:
                raise ValueError(f"listeners.{n}.mode: 'feedback' needs workers: 0 (reports are read in the main "
                                 "process)")

    def _check_workloads(self) -> None:
        accounts = self.service_accounts
        if self.http_api.address is not None and self.http_api.keys_file is None and not accounts.enabled:
            raise ValueError("http_api.keys_file: required when address is set: every request is authenticated "
                             "by an API key (or, with service_accounts.enabled, by a ServiceAccount token)")
        if accounts.enabled and accounts.verify == "tokenreview" and not self.kubernetes.enabled:
            raise ValueError("service_accounts.verify: 'tokenreview' calls the API server: set kubernetes.enabled "
                             "(or verify: jwks)")
        for n, listener in enumerate(self.listeners):
            if listener.auth is not None and listener.auth.credentials_file is None and not accounts.enabled:
                raise ValueError(f"listeners.{n}.auth.credentials_file: required: AUTH checks passwords in it (or, "
                                 "with service_accounts.enabled, ServiceAccount tokens only)")
            if not listener.identify_pods:
                continue
            if not self.kubernetes.enabled:
                raise ValueError(f"listeners.{n}.identify_pods: the pods are watched through the API server: "
                                 "set kubernetes.enabled")
            if self.workers:
                raise ValueError(f"listeners.{n}.identify_pods: needs workers: 0 (the pod watch runs in the main "
                                 "process)")
            if listener.trusted_networks:
                raise ValueError(f"listeners.{n}.identify_pods: trusted_networks would let any address in them "
                                 "relay without a pod: leave it empty")

    @property
    def suppression_path(self) -> Path:
        return self.suppression.path or self.spool.path / "suppression.db"

    @property
    def spool_shard(self) -> Path:
        """The one spool shard: the main process owns it, worker processes attach to it."""
        return self.spool.path / "0"

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, value: str) -> str:
        if not _HOSTNAME.match(value) or "." not in value.strip("."):
            raise ValueError(f"{value!r} is not a fully qualified host name")
        return value.rstrip(".")

    @model_validator(mode="after")
    def _unique(self) -> Config:
        names = [item.name for item in self.listeners]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"listener names must be unique: {', '.join(dupes)}")
        addresses = [item.host_port for item in self.listeners]
        if len(set(addresses)) != len(addresses):
            raise ValueError("two listeners share one address")
        seen: set[str] = set()
        for route in self.routes:
            for domain in route.domains:
                if domain in seen:
                    raise ValueError(f"domain {domain!r} appears in more than one route")
                seen.add(domain)
        self._check_fallbacks()
        self._check_workloads()
        self._check_feedback()
        levels = [("delivery.tls_level", self.delivery.tls_level)] + [
            (f"tls_policy.{n}.level", rule.level) for n, rule in enumerate(self.tls_policy)]
        for key, level in levels:
            if level == "dane" and not (self.dns.dnssec and self.delivery.dane):
                raise ValueError(f"{key}: level 'dane' needs dns.dnssec: true (a validating resolver) "
                                 "and delivery.dane: true")
        matched: set[str] = set()
        for rule in self.tls_policy:
            for pattern in rule.match:
                if pattern in matched:
                    raise ValueError(f"domain {pattern!r} appears in more than one tls_policy rule")
                matched.add(pattern)
        return self


# -- loading -----------------------------------------------------------------


def _set_path(tree: dict[str, Any], parts: list[str], value: Any, env_name: str) -> None:
    node: Any = tree
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) > len(node):
                raise ConfigError(f"{env_name}: {part!r} is not an index of that list (it has {len(node)} items)")
            index = int(part)
            if index == len(node):
                node.append({})
            if last:
                node[index] = value
            else:
                node = node[index]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"{env_name}: {'.'.join(parts[:depth])} is not a section")
        if last:
            node[part] = value
        else:
            if part not in node or node[part] is None:
                node[part] = [] if parts[depth + 1].isdigit() else {}
            node = node[part]


def _env_overrides(tree: dict[str, Any], environ: Mapping[str, str]) -> None:
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX):].split("__")]
        if not all(parts):
            raise ConfigError(f"{name}: empty key segment")
        try:
            value = yaml.safe_load(environ[name]) if environ[name] != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"{name}: not a valid value: {exc}") from None
        if parts[0] == "listeners" and len(parts) > 1 and "listeners" not in tree:
            # Overriding one listener key starts from the default listeners.
            tree["listeners"] = [item.model_dump(mode="json") for item in _default_listeners()]
        _set_path(tree, parts, value, name)


def _suggest(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """For an unknown key, the known key it most resembles."""
    node: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = node.model_fields.get(part) if hasattr(node, "model_fields") else None
        if field is None:
            return ""
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        node = next((a for a in (annotation, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if node is None:
            return ""
    if not hasattr(node, "model_fields"):
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(node.model_fields), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _format(exc: ValidationError, source: str) -> str:
    lines = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key" + _suggest(Config, loc)
        lines.append(f"{source}: {key}: {message}")
    return "\n".join(lines)


def load(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Build the configuration from a file (or the embedded default) and env."""
    environ = os.environ if environ is None else environ
    if path is None and environ.get("MTA_CONFIG"):
        path = environ["MTA_CONFIG"]
    tree, source = _read_tree(path, environ)
    try:
        config = Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format(exc, source)) from None
    return with_pod_identity(config, environ)


def load_probe(path: str | Path, environ: Mapping[str, str] | None = None) -> ProbeConfig:
    """The synthetic probe's own file (``mta probe``), with the same environment overrides."""
    tree, source = _read_tree(path, os.environ if environ is None else environ)
    try:
        return ProbeConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format(exc, source)) from None


def _read_tree(path: str | Path | None, environ: Mapping[str, str]) -> tuple[dict[str, Any], str]:
    tree: dict[str, Any] = {}
    source = "embedded default"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
        tree = loaded
    if any(name.startswith(ENV_PREFIX) for name in environ):
        _env_overrides(tree, environ)
        source += " + environment"
    return tree, source
