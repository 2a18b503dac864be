"""One spool directory: its layout, the durable write protocol, loading.

A spool directory is one shard of the queue (``mta`` runs one, shard ``0``).
One process owns it: it holds the lock, loads it at open, and is the only
one to change or remove what it holds.  ``mta serve`` takes it first
(``take``) and loads it in the background (``load``) while its listeners
already store new mail: the loader reads only ids from before the take.  Other processes of the same server
(``mta.workers``) may attach to it and only add new messages; the owner
finds those it was not told about with ``unannounced``.

Layout of a spool directory::

    lock              flock'd by the owning process
    tmp/              metadata being written; cleared at open
    msg/<ID>          the raw message, written once, never changed
    incoming/<ID>.json   metadata of mail not yet attempted
    deferred/<ID>.json   metadata of mail waiting for a retry
    hold/<ID>.json       metadata of mail an operator put on hold
    corrupt/          files that failed to load, kept for a human

A message's state is the directory its metadata is in; a state change is a
rename.  Storing writes ``msg/<ID>`` and ``tmp/<ID>.json``, fsyncs both and
the ``msg`` directory, then renames the metadata into ``incoming/`` and
fsyncs that directory: the metadata file is the commit marker.  A message
file without metadata was never acknowledged and is removed when loaded.  If two
metadata files exist for one id (a crash between rename and unlink), the
higher ``revision`` wins.

Failures: writes raise ``SpoolError`` and keep nothing of the failed change;
a file that fails to load is moved to ``corrupt/``, logged and counted, and
loading goes on; so is anything that is not a regular file (a FIFO, a
device, a symbolic link), judged by ``lstat`` and never opened, as opening a
FIFO would hang the start.  ``SpoolLocked`` when another process owns the directory.
Directories are created with explicit modes (``DIR_MODE``), whatever the
umask: mail is not for other local users to read.
``unannounced`` logs and skips a metadata file it cannot read: the owner
quarantines it at its next open.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import stat
import time
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spool.commit import Batch, Change, Committer
from spool.errors import SpoolError, UnknownMessage
from spool.ids import cutoff, since
from spool.lock import DirectoryLock
from spool.record import Record, RecordError, loads

log = logging.getLogger(__name__)

INCOMING = "incoming"
DEFERRED = "deferred"
HOLD = "hold"
STATES = (INCOMING, DEFERRED, HOLD)
CORRUPT = "corrupt"


@dataclass
class LoadResult:
    records: list[Record] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)  # names moved to corrupt/
    removed_uncommitted: int = 0


RECENT_BYTES = 16 * 1024 * 1024  # message bodies kept in memory after a store
ROOT_MODE = 0o750  # the shard directory: its group may look (e.g. a monitoring sidecar), not read mail
DIR_MODE = 0o700  # tmp/, msg/, the states and corrupt/: the owner only


def _make_dir(path: Path, mode: int) -> None:
    # mkdir's mode is filtered by the umask (000 would give 0777), so the
    # mode is set explicitly, also on a directory an older version created.
    path.mkdir(mode=mode, exist_ok=True)
    os.chmod(path, mode)


class Spool:
    """A spool directory, owned by this process (``open``) or attached to (``attach``).

    An owned spool has two commit threads: one for stores and state
    changes, whose callers wait for the disk, and one for removals, so that
    deleting delivered mail never holds up the next ``250``.  A removal is
    only ever submitted after every change to that message has completed.
    An attached spool has only the first, and only stores.
    """

    def __init__(self, root: Path, sync: str = "syncfs") -> None:
        self.root = Path(root)
        self.sync = sync
        self.lock = DirectoryLock(self.root / "lock")
        self._committer: Committer | None = None
        self._reaper: Committer | None = None
        # Bodies just stored, so that delivering them right after does not
        # read them back; oldest first, bounded by RECENT_BYTES.
        self._recent: dict[str, bytes] = {}
        self._recent_bytes = 0
        # Told how long each store, save and remove took until durable
        # (operation, seconds), for the write-duration metric.
        self.observe: Callable[[str, float], None] | None = None

    # -- ownership -------------------------------------------------------

    def open(self) -> LoadResult:
        """Take ownership, create the layout and load every message."""
        self.take()
        try:
            return self.load()
        except BaseException:
            self.close()
            raise

    def take(self) -> str:
        """Take ownership and create the layout, without reading what is queued.

        Returns the cut-off for ``load``: mail stored from now on (the
        listeners may take it at once) has ids from it on, and ``load``
        leaves it to whoever stored it.
        """
        for parent in reversed(self.root.parents):
            if not parent.exists():
                _make_dir(parent, ROOT_MODE)
        _make_dir(self.root, ROOT_MODE)
        self.lock.acquire()
        try:
            for name in ("tmp", "msg", CORRUPT, *STATES):
                _make_dir(self.root / name, DIR_MODE)
            for leftover in (self.root / "tmp").iterdir():
                leftover.unlink()
        except BaseException:
            self.lock.release()
            raise
        self._committer = Committer(name=f"spool-commit:{self.root.name}", sync=self.sync)
        self._reaper = Committer(name=f"spool-reap:{self.root.name}", sync=self.sync)
        return cutoff()

    def load(self, before: str | None = None) -> LoadResult:
        """Every message queued before ``before`` (``take``'s cut-off; default, now).

        Safe to run in a thread while new mail is stored and delivered: files
        whose id is from the cut-off on are not looked at (a message file
        whose metadata is still being written is not "uncommitted"), and a
        file gone meanwhile is skipped.  Producers that reuse an older id (a
        handoff from another pod, a retried idempotent request) must wait
        until the load is done.
        """
        return self._load(before or cutoff())

    def attach(self) -> None:
        """Write new messages into a spool another process of this server owns.

        For ``mta.workers``: the owner has locked and loaded the spool; a
        worker only adds messages (ids are unique), so it needs no lock and
        loads nothing.  ``store`` is the only change it may make.
        """
        self._committer = Committer(name=f"spool-commit:{self.root.name}", sync=self.sync)

    def unannounced(self, known: Container[str], min_age: float) -> list[Record]:
        """Records in ``incoming/`` whose id is not in ``known``, oldest id first.

        For the owner of a spool that attached processes store into: a
        message one of them stored but never announced (it died in between)
        is found here.  Metadata younger than ``min_age`` seconds is left
        out, as its announcement may still be on its way.  A file removed
        meanwhile (delivered) is skipped; one that cannot be read is logged
        and skipped, and left for the loader to quarantine at the next open.
        """
        limit = time.time() - min_age
        try:
            names = sorted(entry.name for entry in os.scandir(self.root / INCOMING))
        except OSError as exc:
            log.error("cannot scan %s for unannounced mail: %s", self.root / INCOMING, exc)
            return []
        found = []
        for name in names:
            record_id = name.removesuffix(".json")
            if record_id == name or record_id in known:
                continue  # not metadata (the loader judges those), or already queued
            try:
                if self._meta_path(INCOMING, record_id).stat().st_mtime > limit:
                    continue
                found.append(self.read_record(INCOMING, record_id))
            except FileNotFoundError:
                continue  # delivered and removed meanwhile
            except (OSError, RecordError) as exc:
                log.error("queue_id=%s unreadable in the spool: %s", record_id, exc)
        return found

    def read_record(self, state: str, record_id: str) -> Record:
        """One metadata file, as the loader would read it (``RecordError`` if damaged)."""
        record = loads(self._meta_path(state, record_id).read_bytes())
        if record.id != record_id:
            raise RecordError(f"id {record.id} does not match file name")
        record.state = state
        return record

    def close(self) -> None:
        for committer in (self._committer, self._reaper):
            if committer is not None:
                committer.close()
        self._committer = self._reaper = None
        self._recent.clear()
        self._recent_bytes = 0
        self.lock.release()

    def in_use(self) -> bool:
        """True when another process owns this spool now."""
        return self.lock.held_elsewhere()

    @property
    def stats(self) -> tuple[int, int]:
        """(commit rounds, changes committed) since open, removals included."""
        done = [c for c in (self._committer, self._reaper) if c is not None]
        return sum(c.rounds for c in done), sum(c.changes for c in done)

    # -- paths -----------------------------------------------------------

    def message_path(self, record_id: str) -> Path:
        return self.root / "msg" / record_id

    def _meta_path(self, state: str, record_id: str) -> Path:
        if state not in STATES:
            raise ValueError(f"unknown spool state {state!r}")
        return self.root / state / f"{record_id}.json"

    def read_message(self, record_id: str) -> bytes:
        try:
            return self.message_path(record_id).read_bytes()
        except FileNotFoundError:
            raise UnknownMessage(record_id) from None

    async def message(self, record_id: str) -> bytes:
        """The raw message, from memory if it was stored recently."""
        data = self._recent.get(record_id)
        if data is None:
            data = await asyncio.to_thread(self.read_message, record_id)
        return data

    def _remember(self, record_id: str, data: bytes) -> None:
        if len(data) > RECENT_BYTES // 4:
            return
        self._recent[record_id] = data
        self._recent_bytes += len(data)
        while self._recent_bytes > RECENT_BYTES:
            self._forget(next(iter(self._recent)))

    def _forget(self, record_id: str) -> None:
        data = self._recent.pop(record_id, None)
        if data is not None:
            self._recent_bytes -= len(data)

    # -- changes ---------------------------------------------------------

    def _store_change(self, data: bytes, record: Record) -> Change:
        record = dataclasses.replace(record, size=len(data), state=INCOMING, revision=1)
        tmp = self.root / "tmp" / f"{record.id}.1.json"

        def change(batch: Batch) -> Record:
            batch.write(self.message_path(record.id), data)
            batch.write(tmp, record.dumps())
            batch.rename(tmp, self._meta_path(INCOMING, record.id))
            return record

        return change

    def _save_change(self, record: Record, state: str | None) -> Change:
        new_state = state or record.state
        new = dataclasses.replace(record, state=new_state, revision=record.revision + 1)
        tmp = self.root / "tmp" / f"{record.id}.{new.revision}.json"
        old_path = self._meta_path(record.state, record.id)

        def change(batch: Batch) -> Record:
            batch.write(tmp, new.dumps())
            batch.rename(tmp, self._meta_path(new_state, record.id))
            if new_state != record.state:
                batch.unlink(old_path)
            return new

        return change

    def _remove_change(self, record: Record) -> Change:
        def change(batch: Batch) -> None:
            # Metadata first: once it is gone the message no longer exists,
            # and a leftover message file is cleaned at the next open.
            batch.unlink(self._meta_path(record.state, record.id))
            batch.unlink(self.message_path(record.id))

        return change

    def _committer_or_fail(self) -> Committer:
        if self._committer is None:
            raise SpoolError("spool is not open")
        return self._committer

    def _reaper_or_fail(self) -> Committer:
        if self._reaper is None:
            raise SpoolError("spool is not open")
        return self._reaper

    async def _commit(self, operation: str, committer: Committer, change: Change) -> Any:
        started = time.perf_counter()
        try:
            return await asyncio.wrap_future(committer.submit(change))
        finally:
            if self.observe is not None:
                self.observe(operation, time.perf_counter() - started)

    async def store(self, data: bytes, record: Record) -> Record:
        """Make a new message durable; returns the stored record."""
        stored: Record = await self._commit("store", self._committer_or_fail(), self._store_change(data, record))
        self._remember(stored.id, data)
        return stored

    async def save(self, record: Record, state: str | None = None) -> Record:
        """Write a new revision of ``record``, moving it to ``state`` if given."""
        saved: Record = await self._commit("save", self._committer_or_fail(), self._save_change(record, state))
        return saved

    async def remove(self, record: Record) -> None:
        self._forget(record.id)
        await self._commit("remove", self._reaper_or_fail(), self._remove_change(record))

    # Blocking twins, for tools that run without an event loop.
    def store_blocking(self, data: bytes, record: Record) -> Record:
        return self._committer_or_fail().run(self._store_change(data, record))

    def save_blocking(self, record: Record, state: str | None = None) -> Record:
        return self._committer_or_fail().run(self._save_change(record, state))

    def remove_blocking(self, record: Record) -> None:
        self._reaper_or_fail().run(self._remove_change(record))

    # -- loading ---------------------------------------------------------

    def _quarantine(self, path: Path, reason: str, result: LoadResult) -> None:
        target = self.root / CORRUPT / f"{path.parent.name}-{path.name}-{int(time.time())}"
        try:
            os.rename(path, target)
        except FileNotFoundError:
            return
        log.error("spool file %s quarantined to %s: %s", path, target, reason)
        result.corrupt.append(target.name)

    def _metadata_files(self, before: str) -> Iterator[tuple[str, Path]]:
        for state in STATES:
            for path in sorted((self.root / state).iterdir()):
                if not since(path.name.removesuffix(".json"), before):
                    yield state, path

    def _load(self, before: str) -> LoadResult:
        result = LoadResult()
        best: dict[str, tuple[Record, Path]] = {}
        bad_ids: set[str] = set()
        for state, path in self._metadata_files(before):
            try:
                if path.suffix != ".json":
                    raise RecordError("not a metadata file")
                if not stat.S_ISREG(path.lstat().st_mode):
                    raise RecordError("not a regular file")
                record = self.read_record(state, path.stem)
            except FileNotFoundError:
                continue  # changed state (renamed) or removed meanwhile: read under its new name, or gone
            except (RecordError, OSError) as exc:
                bad_ids.add(path.name.removesuffix(".json"))
                self._quarantine(path, str(exc), result)
                continue
            previous = best.get(record.id)
            if previous is None:
                best[record.id] = (record, path)
                continue
            # A crash between a rename and its unlink: keep the newer one.
            keep, drop = (record, path), previous
            if previous[0].revision >= record.revision:
                keep, drop = previous, (record, path)
            best[record.id] = keep
            drop[1].unlink()
        for record_id, (record, path) in sorted(best.items()):
            msg = self.message_path(record_id)
            try:
                info = msg.lstat()
            except FileNotFoundError:
                self._quarantine(path, "message file missing", result)
                continue
            if not stat.S_ISREG(info.st_mode):
                self._quarantine(path, "its message file is not a regular file", result)
                self._quarantine(msg, "not a regular file", result)
                continue
            size = info.st_size
            if size != record.size:
                self._quarantine(path, f"message file has {size} bytes, expected {record.size}", result)
                self._quarantine(msg, "truncated or altered message file", result)
                continue
            result.records.append(record)
        for msg in (self.root / "msg").iterdir():
            if msg.name in best or since(msg.name, before):
                continue
            if msg.name in bad_ids:
                self._quarantine(msg, "its metadata failed to load", result)
            else:
                # Never acknowledged: the commit marker was not written.
                msg.unlink()
                result.removed_uncommitted += 1
        if result.corrupt:
            log.error("spool %s: %d file(s) quarantined", self.root, len(result.corrupt))
        return result
