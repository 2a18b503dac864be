"""Idempotency-Key answers of the HTTP API, kept for 24 hours on the spool volume.

A request with a key reserves ``(account, key) -> queue id`` before the
message is put into the intake, and marks it stored after; both commits
are durable (SQLite, WAL, ``synchronous=FULL``).  A retry of a stored key
gets the same id and queues nothing; a retry of a key reserved but not
marked (the process died in between) queues under the reserved id, and
the caller skips the put when the spool already holds that id, so a
message is never queued twice.  Keys are per account: two accounts may
use the same key.  Rows older than ``TTL`` are deleted as they are met
and on each reservation.

Failure: ``sqlite3.Error`` propagates (the request gets 503 and nothing
was queued); the file is created on first use.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mta.keyed_lock import KeyedLock

TTL = 86400.0
MAX_KEY_LENGTH = 255


@dataclass(frozen=True)
class Known:
    queue_id: str
    stored: bool


class IdempotencyStore:
    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS idempotency (account TEXT NOT NULL, key TEXT NOT NULL, "
                         "queue_id TEXT NOT NULL, stored INTEGER NOT NULL, created REAL NOT NULL, "
                         "PRIMARY KEY (account, key))")
        self._mutex = threading.Lock()
        self._keys = KeyedLock()

    def close(self) -> None:
        with self._mutex:
            self._db.close()

    def lock(self, account: str, key: str) -> contextlib.AbstractAsyncContextManager[None]:
        """One request per key at a time: a parallel retry waits for the first one's answer."""
        return self._keys.hold((account, key))

    def _run(self, sql: str, args: tuple[object, ...]) -> list[tuple[object, ...]]:
        with self._mutex:
            return self._db.execute(sql, args).fetchall()

    async def get(self, account: str, key: str) -> Known | None:
        rows = await asyncio.to_thread(self._run, "SELECT queue_id, stored, created FROM idempotency "
                                       "WHERE account = ? AND key = ?", (account, key))
        if not rows:
            return None
        queue_id, stored, created = rows[0]
        if self.clock() - float(created) > TTL:  # type: ignore[arg-type]
            await asyncio.to_thread(self._run, "DELETE FROM idempotency WHERE account = ? AND key = ?",
                                    (account, key))
            return None
        return Known(str(queue_id), bool(stored))

    async def reserve(self, account: str, key: str, queue_id: str) -> None:
        now = self.clock()
        await asyncio.to_thread(self._run, "DELETE FROM idempotency WHERE created < ?", (now - TTL,))
        await asyncio.to_thread(self._run, "INSERT OR REPLACE INTO idempotency VALUES (?, ?, ?, 0, ?)",
                                (account, key, queue_id, now))

    async def stored(self, account: str, key: str) -> None:
        await asyncio.to_thread(self._run, "UPDATE idempotency SET stored = 1 WHERE account = ? AND key = ?",
                                (account, key))
