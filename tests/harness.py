"""Run the real ``mta serve`` as a child process, as an operator would.

Tests give a config as a dict; the harness writes it as YAML, picks free
loopback ports, starts the server, waits for ``/readyz``, and stops or
kills it by its own PID.  ``queue()`` runs the real ``mta queue`` CLI.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import smtplib
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tests.peers.net import free_port, wait_port

HOST = "127.0.0.1"


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def server_config(workdir: Path, port: int, http_port: int, config: dict[str, Any]) -> dict[str, Any]:
    """The tests' base configuration with ``config`` merged in; listener addresses may say ``{port}``."""
    base = {
        "hostname": "mta.kubemta.test",
        "spool": {"path": str(workdir / "spool")},
        "listeners": [{"name": "relay", "address": f"{HOST}:{port}", "mode": "relay",
                       "trusted_networks": ["127.0.0.0/8"]}],
        "http": {"address": f"{HOST}:{http_port}"},
        # The peers live on loopback: direct delivery may go there (delivery.allowed_networks).
        "delivery": {"connect_timeout": "5s", "command_timeout": "20s", "allowed_networks": ["127.0.0.0/8"]},
        "shutdown": {"timeout": "5s"},
        "log": {"level": "debug"},
    }
    merged = merge(base, config)
    for listener in merged["listeners"]:
        listener["address"] = listener["address"].format(port=port)
    return merged


class MtaServer:
    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port(HOST)
        self.http_port = free_port(HOST)
        self.config = server_config(workdir, self.port, self.http_port, config)
        self.config_path = workdir / "mta.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.log_path = workdir / "mta.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def spool_dir(self) -> Path:
        return Path(self.config["spool"]["path"]) / "0"

    def start(self, wait: bool = True, entry_point: bool = False) -> None:
        """``entry_point``: run the installed ``mta`` script, as an operator does, not ``python -P -m``."""
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"---- start {self.starts} ----\n".encode())
            log.flush()
            command = [str(Path(sys.executable).parent / "mta")] if entry_point else \
                [sys.executable, "-P", "-m", "mta.cli"]
            self.proc = subprocess.Popen(
                [*command, "serve", "-c", str(self.config_path)],
                cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, env=self._env())
        if wait:
            self.wait_ready()

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MTA")}
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def wait_ready(self, timeout: float = 20.0, loaded: bool = True) -> None:
        """Until /readyz answers 200 and, with ``loaded``, the queue from before this start is loaded
        (``mta serve`` takes mail while it loads the spool in the background)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"mta serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"http://{HOST}:{self.http_port}/readyz", timeout=2) as response:
                    if response.status == 200 and (not loaded or self.loaded()):
                        wait_port(HOST, self.port, timeout=2)
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"mta serve not ready after {timeout}s:\n{self.log()}")

    def loaded(self) -> bool:
        """Whether the current start has logged ``spool_loaded``."""
        since = self.log().rpartition(f"---- start {self.starts} ----")[2]
        return '"event":"spool_loaded"' in since or "event=spool_loaded " in since  # log.format json or text

    def readyz(self) -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.http_port}/readyz", timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.terminate(timeout=15)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def cli(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-P", "-m", "mta.cli", *args, "-c", str(self.config_path)],
                              cwd=self.workdir, capture_output=True, text=True, timeout=timeout, env=self._env())

    def queue(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.cli("queue", *args)

    def queue_list(self) -> list[dict[str, Any]]:
        done = self.queue("list", "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def wait_for_queue(self, predicate: Any, timeout: float = 20.0, what: str = "queue condition") -> list[Any]:
        deadline = time.monotonic() + timeout
        items: list[Any] = []
        while time.monotonic() < deadline:
            items = self.queue_list()
            if predicate(items):
                return items
            time.sleep(0.2)
        raise TimeoutError(f"{what} not reached in {timeout}s; queue: {json.dumps(items, indent=1)}\n{self.log()}")

    def wait_queue_empty(self, timeout: float = 20.0) -> None:
        self.wait_for_queue(lambda items: items == [], timeout, "empty queue")

    def wait_for_log(self, text: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log()
            if text in log:
                return log
            time.sleep(0.1)
        raise TimeoutError(f"{text!r} not in the log after {timeout}s:\n{self.log()}")


def send_mail(port: int, sender: str, recipients: list[str], body: str = "hello\r\n", subject: str = "test",
              host: str = HOST) -> str:
    """Submit one message over real SMTP; returns the queue id from the 250 reply."""
    header = f"From: {sender or 'nobody@sender.test'}\r\nTo: {', '.join(recipients)}\r\nSubject: {subject}\r\n"
    with smtplib.SMTP(host, port, timeout=20) as client:
        client.ehlo("app.kubemta.test")
        client.mail(sender or "<>")
        for rcpt in recipients:
            code, text = client.rcpt(rcpt)
            assert code == 250, text
        code, text = client.data((header + "\r\n" + body).encode())
        assert code == 250, text
    return text.decode().rsplit(" ", 1)[1]
