"""The TLS-RPT session record: successful and failed TLS sessions per policy domain and UTC day.

Owns ``<spool.path>/tls/tlsrpt.db`` (SQLite, WAL), so the counts survive a
restart and a report can be sent for a day after the pod that counted it
came back.  Each row is one (day, policy domain, policy, result, sending
IP, MX host, MX address) with a count; ``session`` adds one, ``day``
reads a domain's rows back, ``mark_sent`` remembers which reports went
out, so the daily run and ``mta tls report --send`` never send a day twice.

Failure: ``session`` never raises — a write that fails (a full disk) is
logged and the session goes uncounted, since delivery must not stop for a
report; opening raises ``sqlite3.Error`` or ``OSError``, which the caller
names as a start-up error.
"""

from __future__ import annotations

import datetime
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# RFC 8460 §4.3 result types, and "ok" for a successful session.
RESULT_TYPES = ("starttls-not-supported", "certificate-host-mismatch", "certificate-expired",
                "certificate-not-trusted", "validation-failure", "tlsa-invalid", "dnssec-invalid",
                "dane-required", "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    day TEXT NOT NULL, domain TEXT NOT NULL, policy_type TEXT NOT NULL, policy_string TEXT NOT NULL,
    mx_patterns TEXT NOT NULL, result TEXT NOT NULL, sending_ip TEXT NOT NULL, mx_host TEXT NOT NULL,
    mx_ip TEXT NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (day, domain, policy_type, policy_string, mx_patterns, result, sending_ip, mx_host, mx_ip));
CREATE TABLE IF NOT EXISTS sent (
    day TEXT NOT NULL, domain TEXT NOT NULL, report_id TEXT NOT NULL, endpoints TEXT NOT NULL,
    at REAL NOT NULL, PRIMARY KEY (day, domain));
"""


@dataclass(frozen=True)
class ReportPolicy:
    """The policy a session ran under, as RFC 8460 §4.4 names it."""

    type: str  # sts | tlsa | no-policy-found
    strings: tuple[str, ...] = ()  # the policy's lines (sts) or TLSA records (tlsa)
    mx_patterns: tuple[str, ...] = ()  # sts: the policy's mx entries


@dataclass(frozen=True)
class SessionRow:
    policy: ReportPolicy
    result: str  # "ok" or an RFC 8460 result type
    sending_ip: str  # "" when not known
    mx_host: str
    mx_ip: str  # "" when no address was connected to
    count: int


def utc_day(when: float) -> str:
    return datetime.datetime.fromtimestamp(when, datetime.UTC).date().isoformat()


class SessionRecord:
    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.clock = clock
        # The connector runs in the event loop; the CLI reads in its own process: one connection each.
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=5)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # a crash may lose the last counts, never corrupt them
        self._db.executescript(_SCHEMA)

    def session(self, domain: str, policy: ReportPolicy, result: str, *, sending_ip: str | None, mx_host: str,
                mx_ip: str | None) -> None:
        row = (utc_day(self.clock()), domain.lower().rstrip("."), policy.type, json.dumps(list(policy.strings)),
               json.dumps(list(policy.mx_patterns)), result, sending_ip or "", mx_host.lower().rstrip("."),
               mx_ip or "")
        try:
            with self._lock:
                self._db.execute(
                    "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 1) ON CONFLICT DO UPDATE "
                    "SET count = count + 1", row)
        except sqlite3.Error as exc:
            log.warning("TLS-RPT: session with %s for %s not counted: %s", mx_host, domain, exc)

    def domains(self, day: str) -> list[str]:
        with self._lock:
            rows = self._db.execute("SELECT DISTINCT domain FROM sessions WHERE day = ? ORDER BY domain", (day,))
            return [domain for (domain,) in rows]

    def days(self) -> list[str]:
        with self._lock:
            return [day for (day,) in self._db.execute("SELECT DISTINCT day FROM sessions ORDER BY day")]

    def day(self, day: str, domain: str) -> list[SessionRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT policy_type, policy_string, mx_patterns, result, sending_ip, mx_host, mx_ip, count "
                "FROM sessions WHERE day = ? AND domain = ? ORDER BY policy_type, policy_string, result, mx_host",
                (day, domain)).fetchall()
        return [SessionRow(ReportPolicy(kind, tuple(json.loads(strings)), tuple(json.loads(patterns))),
                           result, ip, host, address, count)
                for kind, strings, patterns, result, ip, host, address, count in rows]

    def sent(self, day: str, domain: str) -> str | None:
        """The report id sent for the domain's day, or None."""
        with self._lock:
            found = self._db.execute("SELECT report_id FROM sent WHERE day = ? AND domain = ?",
                                     (day, domain)).fetchone()
        return found[0] if found else None

    def mark_sent(self, day: str, domain: str, report_id: str, endpoints: list[str]) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO sent VALUES (?, ?, ?, ?, ?)",
                             (day, domain, report_id, json.dumps(endpoints), self.clock()))

    def prune(self, before: str) -> None:
        """Forget days before ``before`` (ISO date): reports are for recent days only."""
        with self._lock:
            self._db.execute("DELETE FROM sessions WHERE day < ?", (before,))
            self._db.execute("DELETE FROM sent WHERE day < ?", (before,))

    def close(self) -> None:
        with self._lock:
            self._db.close()
