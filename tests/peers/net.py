"""Loopback ports and child-process lifetimes for the test peers.

Owns: picking a free loopback port, waiting (bounded) until a TCP port
answers, and stopping a child process we started, by its own PID only.

How it fails: `wait_port` raises TimeoutError naming host:port when nothing
answers in time, or RuntimeError (with the child's exit status) as soon as
the child it is watching dies; `stop_process` escalates SIGTERM -> SIGKILL
and never waits longer than its timeout per step.
"""

from __future__ import annotations

import socket
import subprocess
import time


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_port(host: str = "127.0.0.1", *, udp: bool = False) -> int:
    """Return a port on `host` that is free for TCP (and for UDP too if `udp`).

    The port is only free at the moment we close our probe socket, so a
    caller should bind it soon; that small race is accepted for tests.
    """
    for _ in range(50):
        with socket.socket(_family(host), socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port: int = tcp.getsockname()[1]
            if not udp:
                return port
            # DNS needs the same number free on UDP as well; try it while
            # the TCP probe still holds its half.
            with socket.socket(_family(host), socket.SOCK_DGRAM) as dgram:
                try:
                    dgram.bind((host, port))
                except OSError:
                    continue
                return port
    raise RuntimeError(f"no port free for both TCP and UDP on {host}")


def wait_port(
    host: str,
    port: int,
    timeout: float = 10.0,
    *,
    proc: subprocess.Popen[bytes] | None = None,
) -> None:
    """Poll a TCP connect to host:port until it succeeds, at most `timeout` s.

    If `proc` is given and exits meanwhile, fail at once instead of waiting
    out the timeout: a dead server will never answer.
    """
    deadline = time.monotonic() + timeout
    last_error: OSError | None = None
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with status {proc.returncode} before {host}:{port} answered")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(f"nothing answered on {host}:{port} within {timeout:.1f}s (last error: {last_error})")
        time.sleep(0.05)


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 5.0) -> None:
    """Stop a child we started: SIGTERM, bounded wait, then SIGKILL and reap."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        # After SIGKILL only a kernel problem can keep it; still bound the wait.
        proc.wait(timeout=timeout)
