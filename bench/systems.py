"""The systems under test, each relaying to its own smtp-sink on loopback.

- ``kubemta`` and ``kubemta-dkim`` (RSA-2048, relaxed/relaxed): ``mta serve``
  with a default route to the sink, durable spool as always;
- ``postfix`` and ``postfix-opendkim``: a private Postfix instance (the test
  peer, with the smtp client transports added) relaying to the sink, the
  latter with OpenDKIM as a milter signing RSA-2048 relaxed/relaxed.

Every system reports its processes, so CPU time and memory are counted for
the whole system (Postfix's many daemons, OpenDKIM, kubemta's one process).
Failure: ``start`` raises with the system's own log when it does not come up.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from tests.peers.net import descendants, free_port, wait_port
from tests.peers.postfix import PostfixServer
from tests.peers.sink import SmtpSink

DOMAIN = "bench.test"
HOST = "127.0.0.1"


def cpu_seconds(pids: list[int]) -> float:
    """User+system time of the processes, and of their reaped children."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
    return total / tick


def pss_bytes(pids: list[int]) -> int:
    """Proportional set size: shared pages split among their users, so a sum is fair."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


class Sink:
    """smtp-sink with its running message counter (``-c``)."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port(HOST)
        self.sink = SmtpSink(HOST, self.port, workdir, [])
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # Counting only: no dumps, which would make the sink the bottleneck.
        argv = ["smtp-sink", "-c"]
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]
        argv += [f"{HOST}:{self.port}", "1024"]
        self.out = open(self.sink.workdir / "counter", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, stdout=self.out, stderr=subprocess.DEVNULL)
        wait_port(HOST, self.port, 10, proc=self.proc)

    def count(self) -> int:
        data = (self.sink.workdir / "counter").read_bytes()[-200:]
        marks = [p for p in data.split(b"\r") if b"mesg=" in p]
        return int(marks[-1].split(b"mesg=")[1].split()[0]) if marks else 0

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.out.close()


class System:
    name = ""

    def __init__(self, workdir: Path, sink: Sink) -> None:
        self.workdir = workdir
        self.sink = sink
        self.port = free_port(HOST)

    def pids(self) -> list[int]:
        raise NotImplementedError

    def queue_empty(self) -> bool:
        raise NotImplementedError

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class Redis:
    """redis-server for the shared limits store, nothing persisted."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.port = free_port(HOST)
        self.url = f"redis://{HOST}:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--bind", HOST, "--port", str(self.port), "--save", "",
                                      "--appendonly", "no", "--dir", str(self.workdir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(HOST, self.port, 10, proc=self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


class Kubemta(System):
    def __init__(self, workdir: Path, sink: Sink, dkim_key: Path | None, shared_limits: str | None = None) -> None:
        super().__init__(workdir, sink)
        self.name = "kubemta-dkim" if dkim_key else "kubemta-shared" if shared_limits else "kubemta"
        self.http = free_port(HOST)
        config = {
            "hostname": "bench-mta.bench.test",
            # One core delivers (the main process), the others receive: on 2
            # cores this beat both 0 and 2 workers (bench/NOTES.md).
            "workers": max(1, len(os.sched_getaffinity(0)) - 1),
            "spool": {"path": str(workdir / "spool")},
            "listeners": [{"name": "relay", "address": f"{HOST}:{self.port}", "mode": "relay",
                           "trusted_networks": ["127.0.0.0/8"]}],
            "routes": [{"domains": ["*"], "relay": f"{HOST}:{sink.port}", "tls": "none"}],
            "http": {"address": f"{HOST}:{self.http}"},
            "limits": {"max_connections": 10000, "max_connections_per_ip": 1000},
            "log": {"level": "warning"},
        }
        if dkim_key:
            config["dkim"] = {"keys": [{"domain": DOMAIN, "selector": "bench", "key_file": str(dkim_key)}]}
        if shared_limits:
            # The limits in Redis, and a daily cap no run reaches: every delivered message
            # then costs a round trip to the store (its count), every delivery lane a lease.
            config["limits"]["store"] = {"url": shared_limits}  # type: ignore[index]
            config["shaping"] = {"daily_cap": 1_000_000_000}
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "mta.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.workdir / "mta.log", "ab")  # noqa: SIM115 - inherited by the child
        self.proc = subprocess.Popen([sys.executable, "-P", "-m", "mta.cli", "serve", "-c", str(self.config_path)],
                                     stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        wait_port(HOST, self.port, 30, proc=self.proc)

    def pids(self) -> list[int]:
        return descendants(self.proc.pid) if self.proc else []

    def queue_empty(self) -> bool:
        # From the metrics endpoint: a few milliseconds, like ``postqueue -j``
        # for Postfix (starting ``mta queue list`` would add a Python start-up
        # to every run's end-to-end time).
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.http}/metrics", timeout=5) as response:
                text = response.read().decode()
        except OSError:
            return False
        sizes = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                 if line.startswith("kubemta_queue_messages{")]
        return bool(sizes) and sum(sizes) == 0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)


class RelayPostfix(PostfixServer):
    """The test peer's Postfix, with the smtp client it needs to relay."""

    def _write_config(self) -> None:
        super()._write_config()
        with (self.config_dir / "master.cf").open("a") as master:
            master.write("smtp      unix  -       -       n       -       -       smtp\n"
                         "relay     unix  -       -       n       -       -       smtp\n")


class Postfix(System):
    def __init__(self, workdir: Path, sink: Sink, milter: Path | None = None) -> None:
        super().__init__(workdir, sink)
        self.name = "postfix-opendkim" if milter else "postfix"
        main = {
            "relayhost": f"[{HOST}]:{sink.port}",
            "default_transport": "smtp",
            "relay_transport": "relay",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "smtpd_recipient_restrictions": "permit_mynetworks, reject",
            "smtp_tls_security_level": "none",
            "default_process_limit": "200",
        }
        if milter:
            main.update({"smtpd_milters": f"unix:{milter}", "milter_default_action": "tempfail",
                         "milter_protocol": "6"})
        self.server = RelayPostfix(HOST, self.port, ["bench-local.test"], workdir, extra_main_cf=main)

    def start(self) -> None:
        self.server.start()

    def pids(self) -> list[int]:
        master = self.server._master_pid
        return descendants(master) if master else []

    def queue_empty(self) -> bool:
        done = subprocess.run(["postqueue", "-c", str(self.server.config_dir), "-j"], capture_output=True,
                              text=True)
        return done.returncode == 0 and not done.stdout.strip()

    def stop(self) -> None:
        self.server.stop()


class OpenDkim:
    """OpenDKIM as a milter, signing bench.test with an RSA-2048 key."""

    def __init__(self, workdir: Path, key: Path) -> None:
        # OpenDKIM refuses files under a world-writable directory.
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        workdir.chmod(0o755)
        # A Unix socket, as Debian's Postfix + OpenDKIM set-up uses: on a TCP
        # socket each milter round trip can wait for a delayed ACK.
        self.socket = workdir / "opendkim.sock"
        user = pwd.getpwnam("opendkim") if _has_user("opendkim") else None
        self.key = workdir / "bench.private"
        shutil.copyfile(key, self.key)
        self.key.chmod(0o600)
        if user:
            os.chown(self.key, user.pw_uid, user.pw_gid)
            os.chown(workdir, user.pw_uid, user.pw_gid)  # it creates its socket here
        self.conf = workdir / "opendkim.conf"
        self.conf.write_text(
            f"Socket local:{self.socket}\nUMask 0000\nDomain {DOMAIN}\nSelector bench\nKeyFile {self.key}\n"
            f"Canonicalization relaxed/relaxed\nMode s\nSignatureAlgorithm rsa-sha256\nSyslog no\n"
            f"PidFile {workdir / 'opendkim.pid'}\n" + (f"UserID {user.pw_name}\n" if user else ""))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(["opendkim", "-f", "-x", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=open(self.workdir / "opendkim.log", "ab"))  # noqa: SIM115
        if not wait_until(self.socket.exists, timeout=15):
            raise RuntimeError(f"opendkim did not create {self.socket}")

    def pids(self) -> list[int]:
        return descendants(self.proc.pid) if self.proc else []

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=15)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def wait_until(predicate, timeout: float, step: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()
