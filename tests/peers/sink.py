"""Postfix's smtp-sink(1) as a receiving MX whose every message is dumped.

Owns: one `smtp-sink` child per SmtpSink (its own PID only), its dump
directory `<workdir>/dump` and its stdout/stderr files.  As root it runs
with `-u nobody`, so the dump directory is owned by nobody and every parent
of the workdir must be searchable by nobody (not so under pytest's
/tmp/pytest-of-root, which is 0700); that is checked up front.

Dump format (smtp-sink(1) "DUMP FILE FORMAT", and smtp-sink.c): one file per
transaction, created at MAIL and unlinked on RSET/abort, closed at the end
of DATA *before* the reply is sent.  Lines: X-Client-Addr, X-Client-Proto,
optional X-Helo-Args, X-Mail-Args (text after "MAIL FROM:"), one X-Rcpt-Args
per RCPT, a three-line "Received:" header, then the message with every CR
dropped (so CRLF becomes LF and bare CR vanishes), dot-unstuffed, followed
by one extra LF from the final ".".  The dump is therefore not byte-exact.
Also note: with `-r .` or `-f .` the file is finished before the reject is
sent, so a message rejected at end-of-data still shows up in messages();
and a transaction cut off inside DATA by stop() leaves a truncated dump
that cannot be told apart (one cut off before DATA is skipped).

How it fails: `start()` raises RuntimeError with smtp-sink's stderr when it
exits or its port does not answer in time; `wait_for_messages` raises
TimeoutError listing what was received so far.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .net import require_searchable, wait_port
from .process import PeerProcess

SMTP_SINK = "smtp-sink"
SINK_USER = "nobody"


@dataclass
class SinkMessage:
    """One completed transaction as smtp-sink dumped it."""

    sender: str
    recipients: list[str]
    data: bytes
    mail_args: str = ""
    rcpt_args: list[str] = field(default_factory=list)
    helo: str = ""
    client_addr: str = ""
    path: Path | None = None


def _path_of(args: str) -> str:
    """'<a@b> SIZE=12' -> 'a@b'; '<>' -> ''."""
    first = args.split(" ", 1)[0] if args else ""
    if first.startswith("<") and first.endswith(">"):
        return first[1:-1]
    return first


def parse_dump(raw: bytes, path: Path | None = None) -> SinkMessage:
    """Parse one smtp-sink `-d` dump file (format in the module docstring)."""
    headers: dict[str, list[str]] = {}
    rest = raw
    while rest:
        line, _, after = rest.partition(b"\n")
        if line.startswith(b"Received: "):
            # The Received header is always three lines; the message follows.
            rest = after.split(b"\n", 2)[2] if after.count(b"\n") >= 2 else b""
            break
        name, _, value = line.decode("utf-8", "surrogateescape").partition(": ")
        headers.setdefault(name, []).append(value)
        rest = after
    mail_args = headers.get("X-Mail-Args", [""])[0]
    rcpt_args = headers.get("X-Rcpt-Args", [])
    # Drop the LF that smtp-sink writes for the terminating ".\r\n".
    data = rest[:-1] if rest.endswith(b"\n") else rest
    return SinkMessage(
        sender=_path_of(mail_args),
        recipients=[_path_of(a) for a in rcpt_args],
        data=data,
        mail_args=mail_args,
        rcpt_args=rcpt_args,
        helo=headers.get("X-Helo-Args", [""])[0],
        client_addr=headers.get("X-Client-Addr", [""])[0],
        path=path,
    )


class SmtpSink(PeerProcess):
    """smtp-sink listening on host:port, dumping each message under workdir/dump."""

    def __init__(
        self,
        host: str,
        port: int,
        workdir: Path,
        extra_args: Sequence[str] = (),
        *,
        start_timeout: float = 10.0,
    ) -> None:
        self.host = host
        self.port = port
        self.workdir = Path(workdir).absolute()  # paths go into configs and /proc checks
        self.extra_args = list(extra_args)
        self.start_timeout = start_timeout
        self.dump_dir = self.workdir / "dump"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            raise RuntimeError(f"smtp-sink on {self.address} already running")
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        argv = [SMTP_SINK]
        if os.geteuid() == 0:
            # smtp-sink refuses to run as root without -u.
            user = pwd.getpwnam(SINK_USER)
            os.chown(self.dump_dir, user.pw_uid, user.pw_gid)
            self.dump_dir.chmod(0o700)
            require_searchable(self.dump_dir, SINK_USER)
            argv += ["-u", SINK_USER]
        template = str(self.dump_dir).replace("%", "%%") + "/msg."
        argv += ["-c", "-d", template, *self.extra_args, self.address, "64"]
        with (self.workdir / "sink.out").open("ab") as out, (self.workdir / "sink.err").open("ab") as err:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        try:
            wait_port(self.host, self.port, self.start_timeout, proc=self._proc)
        except (RuntimeError, TimeoutError) as exc:
            self.stop()
            raise RuntimeError(f"smtp-sink {' '.join(argv)} did not come up: {exc}\nstderr:\n{self.stderr()}") from exc


    def restart(self, extra_args: Sequence[str] = ()) -> None:
        """Restart on the same address with other flags; earlier dumps are kept."""
        self.stop()
        self.extra_args = list(extra_args)
        self.start()

    def stderr(self) -> str:
        try:
            return (self.workdir / "sink.err").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _open_dump_files(self) -> set[str]:
        """Names of dump files smtp-sink still holds open (transactions in progress)."""
        if self._proc is None or self._proc.poll() is not None:
            return set()
        fd_dir = Path(f"/proc/{self._proc.pid}/fd")
        names: set[str] = set()
        try:
            fds = list(fd_dir.iterdir())
        except FileNotFoundError:
            return names
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith(str(self.dump_dir) + "/"):
                names.add(os.path.basename(target))
        return names

    def messages(self) -> list[SinkMessage]:
        """Completed messages, oldest first (across restarts)."""
        try:
            # List before looking at open files: a file closed by then is
            # complete for good, one still open is skipped.
            entries = [p for p in self.dump_dir.iterdir() if p.name.startswith("msg.")]
        except FileNotFoundError:
            return []
        still_open = self._open_dump_files()
        found: list[tuple[int, str, SinkMessage]] = []
        for path in entries:
            if path.name in still_open:
                continue
            try:
                mtime = path.stat().st_mtime_ns
                raw = path.read_bytes()
            except FileNotFoundError:
                continue  # an aborted transaction, unlinked meanwhile
            if b"\nReceived: " not in raw:
                continue  # cut off by stop() before DATA: never a message
            found.append((mtime, path.name, parse_dump(raw, path)))
        found.sort(key=lambda item: (item[0], item[1]))
        return [msg for _, _, msg in found]

    def wait_for_messages(self, n: int, timeout: float = 10.0) -> list[SinkMessage]:
        deadline = time.monotonic() + timeout
        while True:
            msgs = self.messages()
            if len(msgs) >= n:
                return msgs
            if time.monotonic() >= deadline:
                summary = "; ".join(f"from=<{m.sender}> to={m.recipients}" for m in msgs) or "nothing"
                raise TimeoutError(
                    f"smtp-sink on {self.address} has {len(msgs)} of {n} messages after {timeout:.1f}s: {summary}"
                )
            time.sleep(0.05)
