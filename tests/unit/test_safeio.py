"""Atomic durable writes: content, mode, the order of flushes and renames, and clean failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spool import safeio
from tests.unit.conftest import Journal


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if safeio.is_temporary(p))


def test_content_and_exact_mode_whatever_the_umask(tmp_path: Path) -> None:
    target = tmp_path / "file"
    old = os.umask(0o077)
    try:
        safeio.write_file(target, b"one\n", 0o640)
    finally:
        os.umask(old)
    assert target.read_bytes() == b"one\n"
    assert target.stat().st_mode & 0o777 == 0o640
    safeio.write_file(target, b"two\n" * 100_000, 0o600)
    assert target.read_bytes() == b"two\n" * 100_000
    assert target.stat().st_mode & 0o777 == 0o600
    assert leftovers(tmp_path) == []


def test_file_flushed_then_renamed_then_directory_flushed(tmp_path: Path, disk_journal: Journal) -> None:
    target = tmp_path / "file"
    safeio.write_file(target, b"data", 0o600)
    directory = tmp_path.resolve()
    [(first, temporary), second, third] = disk_journal
    assert first == "fsync" and temporary.parent == directory and safeio.is_temporary(temporary)
    assert second == ("rename", target)
    assert third == ("fsync", directory)


def test_many_files_all_flushed_before_any_rename_and_one_directory_fsync_each(
        tmp_path: Path, disk_journal: Journal) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    files = [(tmp_path / folder / f"{n}.json", b"%d" % n) for folder in ("a", "b") for n in range(3)]
    safeio.write_files(files, 0o640)
    assert [path.read_bytes() for path, _ in files] == [data for _, data in files]
    kinds = [kind for kind, _ in disk_journal]
    assert kinds == ["fsync"] * 6 + ["rename"] * 6 + ["fsync"] * 2
    assert [path for _, path in disk_journal[-2:]] == [(tmp_path / "a").resolve(), (tmp_path / "b").resolve()]


def test_exclusive_creates_but_never_replaces(tmp_path: Path, disk_journal: Journal) -> None:
    target = tmp_path / "key"
    safeio.write_file(target, b"first", 0o600, exclusive=True)
    assert [kind for kind, _ in disk_journal] == ["fsync", "link", "fsync"]
    assert disk_journal[-1] == ("fsync", tmp_path.resolve())
    with pytest.raises(FileExistsError):
        safeio.write_file(target, b"second", 0o600, exclusive=True)
    assert target.read_bytes() == b"first"
    assert leftovers(tmp_path) == []


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "file"
    safeio.write_file(target, b"old", 0o600)

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        safeio.write_file(target, b"new", 0o600)
    with pytest.raises(OSError, match="No space"):
        safeio.write_file(tmp_path / "other", b"new", 0o600)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_failed_batch_removes_what_it_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    existing = tmp_path / "existing"
    existing.write_bytes(b"old")
    real_fsync = os.fsync

    def directory_fails(fd: int) -> None:
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", directory_fails)
    with pytest.raises(OSError, match="Input/output"):
        safeio.write_files([(tmp_path / "new", b"new"), (existing, b"newer")], 0o600)
    # The new file is gone; the one that existed holds one whole version.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]
    assert existing.read_bytes() == b"newer"


def test_temporary_names_sit_beside_the_target_and_are_recognisable(tmp_path: Path) -> None:
    target = tmp_path / "events" / "0001.json"
    first, second = safeio.temporary_path(target), safeio.temporary_path(target)
    assert first != second and first.parent == target.parent
    assert safeio.is_temporary(first) and not safeio.is_temporary(target)
    assert first.suffix == safeio.TEMPORARY_SUFFIX and first.name.startswith(".0001.json.")
