"""The disk guard: refuse new mail before the spool filesystem is full.

Owns the free-space and free-inode reading of the spool filesystem
(``statvfs``, at most once per ``disk.check_interval``) and two views of
it: ``ready`` (a readiness check, so the pod leaves the Service and clients
go to its peers; ``mta.policy.admission`` refuses new mail with ``452 4.3.1``
on the same reading) and ``metrics`` (gauges).
Delivery is untouched: it only frees space.

Failure: a ``statvfs`` that fails counts as "below the reserve" (refuse
new mail, not ready) with the error as the detail; a filesystem that
reports no inodes at all (some do) is judged on bytes alone.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mta.config import DiskConfig
from mta.obs.log import event

log = logging.getLogger(__name__)


def reserve_amount(reserve: str | int, total: int) -> int:
    """The reserve in bytes (or inodes) on a filesystem of ``total``.

    ``reserve`` is as ``disk.min_free`` validated it: an amount, or a share
    of the filesystem written ``"5%"``.
    """
    if isinstance(reserve, str):
        return int(total * float(reserve.rstrip("%")) / 100)
    return reserve


@dataclass(frozen=True)
class DiskStatus:
    free_bytes: int
    size_bytes: int
    reserve_bytes: int
    free_inodes: int
    inodes: int
    reserve_inodes: int
    error: str = ""

    @property
    def ok(self) -> bool:
        if self.error:
            return False
        if self.free_bytes < self.reserve_bytes:
            return False
        return self.inodes == 0 or self.free_inodes >= self.reserve_inodes

    @property
    def detail(self) -> str:
        if self.error:
            return f"cannot read the spool filesystem: {self.error}"
        text = f"{self.free_bytes} bytes free (reserve {self.reserve_bytes})"
        if self.inodes:
            text += f", {self.free_inodes} inodes free (reserve {self.reserve_inodes})"
        return text if self.ok else f"below the reserve: {text}"


class DiskGuard:
    def __init__(self, path: Path, config: DiskConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self.config = config
        self.clock = clock
        self._status: DiskStatus | None = None
        self._checked = float("-inf")
        self._was_ok = True

    def status(self) -> DiskStatus:
        now = self.clock()
        if self._status is None or now - self._checked >= self.config.check_interval:
            self._status = self._read()
            self._checked = now
            if self._status.ok != self._was_ok:
                self._was_ok = self._status.ok
                event("disk_guard", level=logging.INFO if self._status.ok else logging.WARNING,
                      active=not self._status.ok, path=str(self.path), detail=self._status.detail)
        return self._status

    def _read(self) -> DiskStatus:
        try:
            st = os.statvfs(self.path)
        except OSError as exc:
            return DiskStatus(0, 0, 0, 0, 0, 0, error=exc.strerror or str(exc))
        size = st.f_blocks * st.f_frsize
        return DiskStatus(
            free_bytes=st.f_bavail * st.f_frsize,
            size_bytes=size,
            reserve_bytes=reserve_amount(self.config.min_free, size),
            free_inodes=st.f_favail,
            inodes=st.f_files,
            reserve_inodes=reserve_amount(self.config.min_free_inodes, st.f_files),
        )

    def ready(self) -> tuple[bool, str]:
        status = self.status()
        return status.ok, status.detail

    def metrics(self) -> dict[str, float]:
        status = self.status()
        values = {"guard_active": 0.0 if status.ok else 1.0}
        if not status.error:
            values.update(free_bytes=status.free_bytes, size_bytes=status.size_bytes,
                          reserve_bytes=status.reserve_bytes, free_inodes=status.free_inodes,
                          inodes=status.inodes, reserve_inodes=status.reserve_inodes)
        return values
