"""What every peer run as a child process shares: stopping it, its log, ``with``.

A peer sets ``_proc`` when it starts its process and ``log_path`` to the
file the process writes; ``stop`` ends the process by its own PID
(``stop_process``: SIGTERM, a bounded wait, SIGKILL), ``log_text`` is the
log so far ("" before it exists), and ``with peer:`` starts and stops it.
Peers whose start needs arguments or whose stop does more override them.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from .net import stop_process


class PeerProcess:
    _proc: subprocess.Popen[bytes] | None = None
    log_path: Path

    def start(self, *args: Any) -> object:
        raise NotImplementedError

    def stop(self) -> None:
        stop_process(self._proc)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_lines(self) -> list[str]:
        return self.log_text().splitlines()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
