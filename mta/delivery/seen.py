"""Which recipient domains' MX hosts have offered STARTTLS: never downgrade them silently.

Owns ``<spool.path>/tls/starttls-seen.json``: recipient domain -> when a
TLS session with one of its MX hosts last succeeded.  While that is less
than ``remember`` seconds ago, the TLS policy (``mta.delivery.tlspolicy``)
requires TLS for the domain, so an attacker who strips STARTTLS from the
server's EHLO gets a deferral instead of the mail in plain text (chasquid's
"seen" policy).  The file lives on the spool volume, so the memory survives
restarts and rescheduling of the pod.

A domain's time is written when it is new or a day old in the file, not on
every session, and the file at most every ``write_interval`` seconds (the
rest at the next chance or at ``flush``): a busy domain costs one atomic
write a day, a burst of new domains one write.  At most ``max_domains`` are
kept, the longest unseen go first.

Failure: a file that cannot be read or parsed is logged and ignored (the
store starts empty: opportunistic TLS as before, never a refusal to
start); a failed write is logged and retried at the next success.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from spool import safeio

log = logging.getLogger(__name__)

_REWRITE_AFTER = 86400.0  # refresh a domain's time on disk at most this often
_VERSION = 1


class StartTlsSeen:
    def __init__(self, path: Path, remember: float, *, max_domains: int = 100_000,
                 write_interval: float = 5.0, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.remember = remember
        self.max_domains = max_domains
        self.clock = clock
        self._seen: dict[str, float] = {}  # what the file holds (or will, after the next write)
        self._loaded = False
        self.write_interval = write_interval
        self._dirty = False
        self._written = float("-inf")  # time.monotonic() of the last write

    @property
    def enabled(self) -> bool:
        return self.remember > 0

    def _load(self) -> None:
        self._loaded = True
        try:
            tree = json.loads(self.path.read_text())
            domains = tree["domains"] if tree.get("version") == _VERSION else {}
            self._seen = {str(name): float(when) for name, when in domains.items()}
        except FileNotFoundError:
            self._seen = {}
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            log.warning("%s unreadable (%s); starting with no domain remembered as offering STARTTLS",
                        self.path, exc)
            self._seen = {}

    def required(self, domain: str) -> bool:
        """Whether ``domain`` offered STARTTLS recently enough that plain text would be a downgrade."""
        if not self.enabled:
            return False
        if not self._loaded:
            self._load()
        when = self._seen.get(domain)
        return when is not None and self.clock() - when < self.remember

    def last_seen(self, domain: str) -> float | None:
        if not self._loaded:
            self._load()
        return self._seen.get(domain)

    def record(self, domain: str) -> None:
        """A TLS session with an MX host of ``domain`` succeeded."""
        if not self.enabled:
            return
        if not self._loaded:
            self._load()
        now = self.clock()
        before = self._seen.get(domain)
        if before is not None and now - before < _REWRITE_AFTER:
            return
        self._seen[domain] = now
        if len(self._seen) > self.max_domains:
            for name, _ in sorted(self._seen.items(), key=lambda item: item[1])[:len(self._seen) - self.max_domains]:
                del self._seen[name]
        self._dirty = True
        if time.monotonic() - self._written >= self.write_interval:
            self.flush()

    def flush(self) -> None:
        """Write what changed since the last write."""
        if not self._dirty:
            return
        self._dirty = False
        self._written = time.monotonic()
        data = json.dumps({"version": _VERSION, "domains": self._seen}, sort_keys=True).encode()
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            safeio.write_file(self.path, data, 0o600)
        except OSError as exc:
            self._dirty = True  # try again with the next success
            log.warning("cannot write %s: %s", self.path, exc)
