"""The suppression list: recipients not to send to again, durable in SQLite on the spool volume.

Owns the database file (``suppression.path``, default ``suppression.db``
beside the spool) and its one table.  An entry is an address (kept
lower-case), a scope (``global``, ``domain:<sending domain>`` or
``account:<AUTH user>``), a reason (a bounce category —
``invalid_recipient``, ``invalid_domain`` — or ``complaint`` or
``manual``), the source that added it (``bounce``, ``dsn``, ``arf``,
``operator``, …), the evidence (the reply or report line), when it was
added and when it expires (per reason, ``suppression.expiry``; None is
never).  Adding an entry that exists replaces it (the newest evidence
wins, the expiry starts again).

Several processes use the file at once (``workers: N``, the ``mta suppress``
CLI next to a running server): the database runs in WAL mode, so readers
never wait for a writer, and every connection waits ``busy_timeout`` for
another's write to finish.  Reads (the RCPT check) run on the caller's
thread on a connection of their own; writes open a short-lived connection,
so ``add``/``remove`` may be called from a worker thread
(``asyncio.to_thread``).

Failure: ``SuppressionError`` (naming the file) when the database cannot be
opened, read or written — the RCPT check lets mail through then, and says so
in the log, since a broken list must not stop all mail; a bounce whose
address cannot be added (``add_bounced``) goes on, and the log says so.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mta.bounce.classify import Category
from mta.config import Config, SuppressionConfig
from mta.obs.log import event

log = logging.getLogger(__name__)

GLOBAL = "global"
REASONS = ("invalid_recipient", "invalid_domain", "complaint", "manual")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS suppression (
    address TEXT NOT NULL,
    scope TEXT NOT NULL,
    reason TEXT NOT NULL,
    source TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    expires REAL,
    PRIMARY KEY (address, scope)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS suppression_expires ON suppression (expires);
"""


class SuppressionError(Exception):
    """The suppression database cannot be used; the message names the file."""


@dataclass(frozen=True)
class Entry:
    address: str
    scope: str
    reason: str
    source: str
    detail: str
    created: float
    expires: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def why(self) -> str:
        """The words a client gets at RCPT: suppressed, and why."""
        what = {"invalid_recipient": "an earlier delivery found no such mailbox",
                "invalid_domain": "an earlier delivery found no such domain",
                "complaint": "the recipient reported earlier mail as spam",
                "manual": "an operator suppressed it"}.get(self.reason, self.reason)
        since = time.strftime("%Y-%m-%d", time.gmtime(self.created))
        return f"recipient is on the suppression list since {since}: {what}"


def normalise(address: str) -> str:
    return address.strip().strip("<>").lower()


def scope_for(kind: str, sender: str, user: str | None) -> str:
    """The scope a bounce adds an entry in (``suppression.scope``) for mail from ``sender``/``user``."""
    if kind == "sending_domain" and "@" in sender:
        return f"domain:{sender.rpartition('@')[2].lower()}"
    if kind == "account" and user:
        return f"account:{user}"
    return GLOBAL


def valid_scope(scope: str) -> bool:
    kind, _, name = scope.partition(":")
    return scope == GLOBAL or (kind in ("domain", "account") and bool(name))


class SuppressionList:
    def __init__(self, path: Path, settings: SuppressionConfig, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.settings = settings
        self.clock = clock
        self._reader: sqlite3.Connection | None = None
        self._reader_thread: int | None = None
        self._lock = threading.Lock()

    # -- connections -----------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, timeout=self.settings.busy_timeout, isolation_level=None,
                                         check_same_thread=False)
            connection.execute(f"PRAGMA busy_timeout = {int(self.settings.busy_timeout * 1000)}")
            # WAL: the RCPT check of one process never waits for another's write.
            connection.execute("PRAGMA journal_mode = WAL")
            # FULL: an entry an operator was told is added survives a power cut.
            connection.execute("PRAGMA synchronous = FULL")
            return connection
        except (sqlite3.Error, OSError) as exc:
            raise SuppressionError(f"suppression list {self.path}: {exc}") from None

    def open(self) -> None:
        """Create the file and table if needed (at start-up, so a bad path stops start-up)."""
        with self._writer() as connection:
            connection.executescript(_SCHEMA)
        self.path.chmod(0o600)

    @contextmanager
    def _writer(self) -> Iterator[sqlite3.Connection]:
        connection = self._connect()
        try:
            yield connection
        except sqlite3.Error as exc:
            raise SuppressionError(f"suppression list {self.path}: {exc}") from None
        finally:
            connection.close()

    def _read(self, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        # One reading connection per list, used under a lock (the RCPT check may
        # come from the event loop and the CLI from its own thread).
        with self._lock:
            if self._reader is None:
                self._reader = self._connect()
                self._reader.executescript(_SCHEMA)
            try:
                return self._reader.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise SuppressionError(f"suppression list {self.path}: {exc}") from None

    def close(self) -> None:
        with self._lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    # -- reading ---------------------------------------------------------------

    def lookup(self, address: str, sending_domain: str | None = None, account: str | None = None) -> Entry | None:
        """The entry that stops mail to ``address`` from this sender, if any (expired ones do not)."""
        scopes = [GLOBAL]
        if sending_domain:
            scopes.append(f"domain:{sending_domain.lower()}")
        if account:
            scopes.append(f"account:{account}")
        marks = ",".join("?" * len(scopes))
        rows = self._read(f"SELECT * FROM suppression WHERE address = ? AND scope IN ({marks}) "
                          "AND (expires IS NULL OR expires > ?) ORDER BY created LIMIT 1",
                          (normalise(address), *scopes, self.clock()))
        return Entry(*rows[0]) if rows else None

    def entries(self, address: str | None = None, *, include_expired: bool = False,
                limit: int = 10_000) -> list[Entry]:
        where, args = [], []
        if address is not None:
            where.append("address = ?")
            args.append(normalise(address))
        if not include_expired:
            where.append("(expires IS NULL OR expires > ?)")
            args.append(self.clock())
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._read(f"SELECT * FROM suppression {clause} ORDER BY created, address, scope LIMIT ?",
                          (*args, limit))
        return [Entry(*row) for row in rows]

    # -- writing ---------------------------------------------------------------

    def add(self, address: str, reason: str, source: str, detail: str = "", scope: str = GLOBAL,
            expires_in: float | str | None = "default") -> Entry:
        """Add (or renew) an entry; ``expires_in`` seconds, None for never, or the reason's default."""
        if reason not in REASONS:
            raise ValueError(f"{reason!r} is not a suppression reason ({', '.join(REASONS)})")
        if not valid_scope(scope):
            raise ValueError(f"{scope!r} is not a scope (global, domain:NAME, account:USER)")
        now = self.clock()
        if expires_in == "default":
            expires_in = getattr(self.settings.expiry, reason)
        assert not isinstance(expires_in, str)
        entry = Entry(normalise(address), scope, reason, source, " ".join(detail.split())[:500], now,
                      None if expires_in is None else now + expires_in)
        with self._writer() as connection:
            connection.execute("INSERT OR REPLACE INTO suppression VALUES (?, ?, ?, ?, ?, ?, ?)",
                               (entry.address, entry.scope, entry.reason, entry.source, entry.detail,
                                entry.created, entry.expires))
        return entry

    async def add_bounced(self, queue_id: str, dead: list[tuple[str, Category, str]], scope: str) -> None:
        """Addresses a receiver called dead (recipient, category, reply), added off the event loop.

        A failure is logged and skips that address: the bounce itself goes on.
        """
        for address, category, reply in dead:
            try:
                entry = await asyncio.to_thread(self.add, address, category.value, "bounce", reply, scope)
            except SuppressionError as exc:
                log.error("queue_id=%s cannot suppress %s: %s", queue_id, address, exc)
                continue
            event("suppression_added", queue_id=queue_id, recipient=address, reason=entry.reason, source="bounce",
                  scope=scope, expires=entry.expires)

    def remove(self, address: str, scope: str | None = None) -> int:
        """Remove the address's entries (in one scope, or all); the number removed."""
        with self._writer() as connection:
            if scope is None:
                cursor = connection.execute("DELETE FROM suppression WHERE address = ?", (normalise(address),))
            else:
                cursor = connection.execute("DELETE FROM suppression WHERE address = ? AND scope = ?",
                                            (normalise(address), scope))
            return cursor.rowcount

    def purge_expired(self) -> int:
        with self._writer() as connection:
            return connection.execute("DELETE FROM suppression WHERE expires IS NOT NULL AND expires <= ?",
                                      (self.clock(),)).rowcount


def open_list(config: Config) -> SuppressionList | None:
    """The configured list, its file created; None when ``suppression.enabled`` is off."""
    if not config.suppression.enabled:
        return None
    suppressions = SuppressionList(config.suppression_path, config.suppression)
    suppressions.open()
    return suppressions
