"""Fixtures shared by the unit tests.

``disk_journal`` records, in order, the durability-relevant calls a test
makes (fsyncs with the path of the file or directory synced, renames and
links), so tests can check that data is flushed before it is renamed into
place and that the directory is flushed after.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

Journal = list[tuple[str, Path]]


@pytest.fixture
def disk_journal(monkeypatch: pytest.MonkeyPatch) -> Journal:
    journal: Journal = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        journal.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def recording(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
            result = real(src, dst, *args, **kwargs)
            journal.append((name, Path(dst)))
            return result
        return call

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", recording("rename", os.replace))
    monkeypatch.setattr(os, "rename", recording("rename", os.rename))
    monkeypatch.setattr(os, "link", recording("link", os.link))
    return journal
