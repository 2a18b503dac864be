"""Atomic, durable file writes: after a crash a file holds its old content or its new, never a part.

The one writer for files that must survive a crash whole (chasquid's
``safeio`` in spirit).  The data goes to a temporary file in the target's
own directory (a rename is atomic only within one filesystem), which gets
its mode, is written and fsynced; then it is renamed over the target and
the directory is fsynced, so that the new name is durable too.
``write_files`` does this for many files with one directory fsync per
directory, for callers that persist batches; ``write_file`` for one.

The spool's group commit (``spool.commit``) makes a whole round durable
with one ``syncfs`` and shares only the low-level pieces: ``write_all``
and ``fsync_dir``.

Temporary files are named ``.<target name>.<random>.tmp`` beside their
target (``is_temporary``), so whoever owns a directory can clear what a
crash left there.

Failure: ``OSError`` from the call that failed.  Before it is raised,
every temporary file of the call is removed, and so is every target the
call created; a target that existed before keeps complete content, old
or new.  With ``exclusive=True`` an existing target is never replaced: the
call raises ``FileExistsError`` and leaves it as it was.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

TEMPORARY_SUFFIX = ".tmp"


def temporary_path(target: Path) -> Path:
    """A fresh name beside ``target``: same directory, hence same filesystem."""
    return target.with_name(f".{target.name}.{secrets.token_hex(6)}{TEMPORARY_SUFFIX}")


def is_temporary(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(TEMPORARY_SUFFIX)


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written (one call may write less)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (new names, renames, removals) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes, mode: int, *, exclusive: bool = False) -> None:
    """Atomically and durably make ``path`` hold ``data``, with permissions ``mode``."""
    write_files([(Path(path), data)], mode, exclusive=exclusive)


def write_files(files: Iterable[tuple[Path, bytes]], mode: int, *, exclusive: bool = False) -> None:
    """``write_file`` for many files: all data is flushed before the first rename,
    and each directory is fsynced once, after the last."""
    staged: list[tuple[Path, Path]] = []  # (temporary, target)
    created: list[Path] = []
    try:
        for target, data in files:
            temporary = temporary_path(target)
            # O_EXCL: a name another writer (or a crash) left is never reused.
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            staged.append((temporary, target))
            try:
                # fchmod, not the open mode: the umask must not change what the caller asked for.
                os.fchmod(fd, mode)
                write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        for temporary, target in staged:
            if exclusive:
                # link() fails if the target exists: an atomic "create, never replace".
                os.link(temporary, target)
                created.append(target)
                os.unlink(temporary)
            else:
                existed = os.path.lexists(target)
                os.replace(temporary, target)
                if not existed:
                    created.append(target)
        for directory in dict.fromkeys(target.parent for _, target in staged):
            fsync_dir(directory)
    except OSError:
        for temporary, _ in staged:
            with contextlib.suppress(OSError):
                temporary.unlink()
        for target in created:
            with contextlib.suppress(OSError):
                target.unlink()
        raise
