"""Group commit: many spool writes made durable by one round of fsyncs.

Callers describe a change as a function that fills a ``Batch`` (files to
write, renames and unlinks to do once the written data is on disk).  One
background thread runs whatever changes are waiting as a single round:

1. write every new file (no fsync yet);
2. make them durable: one ``syncfs`` of the spool's filesystem (one journal
   commit for the whole round), or, with ``sync="fsync"``, an fsync of every
   written file and then of every directory a new file appeared in;
3. do the renames (the commit points), fsync their target directories;
4. do the unlinks, fsync their directories.

A change's future completes only after its round finished, so "done" always
means "on disk".  While one round is syncing, new changes queue up and form
the next, larger round: throughput grows with concurrency instead of being
capped at one fsync latency per message.

``syncfs`` writes back every dirty file of the filesystem, so it suits a
spool on a volume of its own (a PersistentVolume); where the spool shares a
busy filesystem, ``fsync`` keeps each round's cost to its own files.  Where
``syncfs`` cannot report write errors (before Linux 5.8) or is missing,
``fsync`` is used.

Failure: if a step of a round fails before its commit point (the renames and
their directory fsyncs), the files the round wrote or renamed into place are
removed, so nothing is half-kept, and each of its changes is then tried
again in a round of its own: only the change that fails again (a colliding
id, a full disk) gets ``SpoolError``; the others commit, with the same
fsync-before-rename order.  A failure after the commit point (an unlink)
fails the changes of that round, as nothing of them can be undone any more.
The thread itself never dies of a failed round.

Files outside the spool that need the same guarantee one at a time (or a
few together) use ``spool.safeio``, whose ``fsync_dir`` and ``write_all``
this module shares.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from spool.errors import SpoolError
from spool.safeio import fsync_dir, write_all

log = logging.getLogger(__name__)

MAX_ROUND = 512  # changes per round; bounds the memory one round pins
SYNC_MODES = ("syncfs", "fsync")


class _AfterCommit(Exception):
    """A round failed after its renames were durable: nothing to undo, nothing to retry."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


class Batch:
    """What one change asks of a commit round."""

    def __init__(self) -> None:
        self.writes: list[tuple[Path, bytes]] = []
        self.renames: list[tuple[Path, Path]] = []
        self.unlinks: list[Path] = []

    def write(self, path: Path, data: bytes) -> None:
        """Create ``path`` (it must not exist) holding ``data``."""
        self.writes.append((path, data))

    def rename(self, src: Path, dst: Path) -> None:
        """Atomically replace ``dst`` with ``src`` once all writes are durable."""
        self.renames.append((src, dst))

    def unlink(self, path: Path) -> None:
        """Remove ``path`` (if present) after the renames."""
        self.unlinks.append(path)


Change = Callable[[Batch], Any]


def _load_syncfs() -> Callable[[int], int] | None:
    # Before Linux 5.8 syncfs did not report write-back errors: a failed
    # write would go unnoticed, so such kernels get the per-file fsync.
    release = os.uname().release.split(".")
    try:
        if (int(release[0]), int(release[1].split("-")[0])) < (5, 8):
            return None
    except (IndexError, ValueError):
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    return getattr(libc, "syncfs", None)


_syncfs = _load_syncfs()


def syncfs(fd: int) -> None:
    """Flush the whole filesystem ``fd`` is on and wait for it.

    It reports write-back errors of any file on the filesystem (Linux 5.8
    and later, the only kernels it is used on), which is what a commit round
    needs to know.
    """
    if _syncfs is None:
        raise OSError("syncfs is not available on this system")
    if _syncfs(fd) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"syncfs: {os.strerror(errno)}")


class Committer:
    """The one thread that writes and syncs a spool's files."""

    def __init__(self, name: str = "spool-commit", sync: str = "syncfs") -> None:
        if sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {', '.join(SYNC_MODES)}, not {sync!r}")
        if sync == "syncfs" and _syncfs is None:
            sync = "fsync"
        self.sync = sync
        self._queue: queue.SimpleQueue[tuple[Change, Future[Any]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self.rounds = 0
        self.changes = 0

    def submit(self, change: Change) -> Future[Any]:
        future: Future[Any] = Future()
        self._queue.put((change, future))
        return future

    def run(self, change: Change) -> Any:
        """Submit and wait (for callers without an event loop)."""
        return self.submit(change).result()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            pending = [item]
            stop = False
            while len(pending) < MAX_ROUND:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                pending.append(more)
            self._round(pending)
            if stop:
                return

    def _round(self, pending: list[tuple[Change, Future[Any]]]) -> None:
        batches: list[tuple[Batch, Any, Future[Any]]] = []
        for change, future in pending:
            if not future.set_running_or_notify_cancel():
                continue
            batch = Batch()
            try:
                value = change(batch)
            except Exception as exc:  # noqa: BLE001 - the caller gets it via the future
                future.set_exception(exc)
                continue
            batches.append((batch, value, future))
        if not batches:
            return
        error = self._commit(batches)
        if error is not None and len(batches) > 1 and not isinstance(error, _AfterCommit):
            # One bad change (a colliding id, ENOSPC on one large message)
            # must not cost every client of the round a 451: undone above,
            # each change now gets a round of its own.
            log.warning("spool commit round of %d changes failed (%s); committing them one by one",
                        len(batches), error)
            for one in batches:
                self._finish([one], self._commit([one]))
            return
        self._finish(batches, error)

    def _commit(self, batches: list[tuple[Batch, Any, Future[Any]]]) -> Exception | None:
        """Apply ``batches`` as one round; on failure undo what it created and return the error."""
        done: list[Path] = []  # files that exist because of this round
        try:
            self._apply(batches, done)
        except _AfterCommit as exc:
            return exc
        except OSError as exc:
            for path in done:
                with contextlib.suppress(OSError):
                    path.unlink()
            return exc
        return None

    def _finish(self, batches: list[tuple[Batch, Any, Future[Any]]], error: Exception | None) -> None:
        if error is not None:
            log.error("spool commit round of %d change(s) failed: %s", len(batches), error)
            failure = SpoolError(f"spool write failed: {error}")
            for _, _, future in batches:
                future.set_exception(failure)
            return
        self.rounds += 1
        self.changes += len(batches)
        for _, value, future in batches:
            future.set_result(value)

    def _apply(self, batches: list[tuple[Batch, Any, Future[Any]]], done: list[Path]) -> None:
        fds: list[int] = []
        new_dirs: set[Path] = set()
        try:
            for batch, _, _ in batches:
                for path, data in batch.writes:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
                    done.append(path)
                    fds.append(fd)
                    write_all(fd, data)
                    new_dirs.add(path.parent)
            if self.sync == "syncfs" and fds:
                # Files and their directory entries in one journal commit.
                syncfs(fds[0])
            else:
                for fd in fds:
                    os.fsync(fd)
        finally:
            for fd in fds:
                os.close(fd)
        if self.sync == "fsync":
            for directory in new_dirs:
                fsync_dir(directory)
        rename_dirs: set[Path] = set()
        for batch, _, _ in batches:
            for src, dst in batch.renames:
                # Undo only what this round created: a rename over an older
                # revision leaves a valid record even if the round fails.
                created = not dst.exists()
                os.rename(src, dst)
                if src in done:
                    done.remove(src)
                if created:
                    done.append(dst)
                rename_dirs.add(dst.parent)
        for directory in rename_dirs:
            fsync_dir(directory)
        # From here on the round is committed: an unlink that fails leaves a
        # stale file the loader resolves by revision, never a lost message.
        done.clear()
        try:
            unlink_dirs: set[Path] = set()
            for batch, _, _ in batches:
                for path in batch.unlinks:
                    try:
                        path.unlink()
                        unlink_dirs.add(path.parent)
                    except FileNotFoundError:
                        pass
            for directory in unlink_dirs:
                fsync_dir(directory)
        except OSError as exc:
            raise _AfterCommit(exc) from exc
