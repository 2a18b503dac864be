"""A real Redis server (Debian's ``redis-server``) for the shared limits store.

Owns: one ``redis-server`` child on 127.0.0.1 and a port of its own (kept
across ``stop``/``start``, so clients reconnect to the same address), with
nothing persisted (``save ""``, no AOF) in its work directory, and a
password when one is given (``requirepass``).

How it fails: ``start`` raises RuntimeError with the server's log when it
exits or its port does not answer in time.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from .net import free_port, stop_process, wait_port

REDIS_SERVER = "redis-server"


class RedisServer:
    def __init__(self, workdir: Path, password: str | None = None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        self.password = password
        self.log_path = workdir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> RedisServer:
        args = [REDIS_SERVER, "--bind", self.host, "--port", str(self.port), "--save", "", "--appendonly", "no",
                "--dir", str(self.workdir), "--daemonize", "no", "--logfile", str(self.log_path)]
        if self.password is not None:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, cwd=self.workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(self.host, self.port, timeout=10, proc=self.proc)
        except (TimeoutError, RuntimeError) as exc:
            self.stop()
            log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
            raise RuntimeError(f"redis-server did not start: {exc}\n{log}") from None
        return self

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None
