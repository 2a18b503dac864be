"""Loopback ports, child-process lifetimes and path checks shared by the peers.

Owns: picking a free loopback port, waiting (bounded) until a TCP port
answers, stopping a child process we started (by its own PID only), and
checking that a daemon user can reach a directory before a peer drops
privileges to it.

How it fails: `wait_port` raises TimeoutError naming host:port when nothing
answers in time, or RuntimeError (with the child's exit status) as soon as
the child it is watching dies; `stop_process` escalates SIGTERM -> SIGKILL
and never waits longer than its timeout per step; `require_searchable`
raises RuntimeError naming the first parent directory the user cannot enter.
"""

from __future__ import annotations

import os
import pwd
import socket
import stat
import subprocess
import time
from pathlib import Path


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


_GIVEN: set[int] = set()


def free_port(host: str = "127.0.0.1", *, udp: bool = False) -> int:
    """Return a port on `host` that is free for TCP (and for UDP too if `udp`).

    The port is only free at the moment we close our probe socket, so a
    caller should bind it soon; that small race is accepted for tests.  A
    number is never handed out twice in one test process: the kernel may
    offer a just-closed probe's port again, and listeners with SO_REUSEPORT
    would then share it (an HTTP probe answered by an SMTP greeting).
    """
    for _ in range(200):
        with socket.socket(_family(host), socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port: int = tcp.getsockname()[1]
            if port in _GIVEN:
                continue
            if not udp:
                _GIVEN.add(port)
                return port
            # DNS needs the same number free on UDP as well; try it while
            # the TCP probe still holds its half.
            with socket.socket(_family(host), socket.SOCK_DGRAM) as dgram:
                try:
                    dgram.bind((host, port))
                except OSError:
                    continue
                _GIVEN.add(port)
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
    out the timeout: a dead server will never answer.  With `proc`, the port
    only counts as up once `proc` itself holds the listening socket, so a
    stranger already listening there (port race) is not mistaken for it.
    """
    deadline = time.monotonic() + timeout
    last_error: OSError | None = None
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with status {proc.returncode} before {host}:{port} answered")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                if proc is None or holds_listener(proc.pid, port):
                    return
        except OSError as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(f"nothing answered on {host}:{port} within {timeout:.1f}s (last error: {last_error})")
        time.sleep(0.05)


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (a server may listen from worker processes)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(children.get(current, []))
    return out


def holds_listener(pid: int, port: int) -> bool:
    """Does process `pid` or one below it hold a TCP socket listening on `port` (any address)?"""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            # fields[1] is "ADDR:PORT" in hex, fields[3] the state (0A = LISTEN).
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    if not inodes:
        return False
    fds: list[Path] = []
    for process in descendants(pid):
        try:
            fds += list(Path(f"/proc/{process}/fd").iterdir())
        except (FileNotFoundError, PermissionError):
            continue
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return True
    return False


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


def require_searchable(path: Path, user: str) -> None:
    """Fail early, with a clear message, if `user` cannot reach `path`.

    Daemons that drop to another user (smtp-sink -u nobody, Postfix's
    postfix/nobody) fail obscurely otherwise -- e.g. under pytest's
    /tmp/pytest-of-root, which is mode 0700.
    """
    pw = pwd.getpwnam(user)
    for parent in [Path(path), *Path(path).parents]:
        st = parent.stat()
        if st.st_uid == pw.pw_uid:
            ok = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid == pw.pw_gid:
            ok = bool(st.st_mode & stat.S_IXGRP)
        else:
            ok = bool(st.st_mode & stat.S_IXOTH)
        if not ok:
            raise RuntimeError(
                f"{parent} (mode {stat.filemode(st.st_mode)}) is not searchable by user {user}, "
                f"who must reach {path}; put peer workdirs under a world-searchable directory"
            )
