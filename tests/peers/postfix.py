"""A private, real Postfix instance that receives mail into Maildirs.

Owns: everything under its workdir -- `etc/` (its own config_directory:
main.cf, master.cf, the texthash mailbox map, a trustme-issued TLS cert and
the CA that signed it), `queue/` (queue_directory, root-owned, subdirectories
created by `postfix start` itself), `data/` (data_directory, owned by the
postfix user), `mail/` (virtual_mailbox_base, owned by nobody, who delivers)
and `postfix.log` (maillog_file, written by postlogd).  /etc/postfix is never
written; Postfix itself only reads its installed metadata (postfix-files,
dynamicmaps.cf) there.  Its master runs daemonized, in its own process group
whose id is the PID in queue/pid/master.pid; `stop()` ends exactly that.

It accepts mail on host:port (STARTTLS offered) for `domains` only: every
address there lands in the domain's catch-all Maildir, `mail/<domain>/`,
and `mailbox(addr)` picks the files whose Delivered-To is addr.  Relaying
elsewhere is refused (554 5.7.1) even from loopback, and nothing can leave:
all non-virtual transports are `error`.

Permission facts learned the hard way: queue_directory and its parents must
be root-owned and not group/other-writable (else `postfix check` warns or
fails), every parent must be searchable by the postfix and nobody users
(so not under pytest's 0700 /tmp/pytest-of-root), and maillog_file must sit
under `maillog_file_prefixes`, which we set to the workdir.

How it fails: `start()` raises RuntimeError with `postfix start` output,
`postfix check` output and the log; `wait_for_mail` raises TimeoutError with
the log's tail; `stop()` escalates to SIGKILL of the master's process group
and is bounded in time.
"""

from __future__ import annotations

import contextlib
import email.parser
import email.policy
import ipaddress
import os
import pwd
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import trustme

from .net import holds_listener, require_searchable, wait_port
from .process import PeerProcess

POSTFIX = "postfix"
MAIL_OWNER = "postfix"
DELIVERY_USER = "nobody"
HOSTNAME = "postfix-peer.test"

# Only what an SMTP-in, virtual-delivery instance needs; chroot off (column 5)
# because the queue dir has no chroot files.  Column 4 "n" = runs as root.
_MASTER_CF = """\
{listen} inet  n       -       n       -       -       smtpd
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def _daemon_directory() -> str:
    res = subprocess.run(
        ["postconf", "-dh", "daemon_directory"], capture_output=True, text=True, timeout=10, check=True
    )
    return res.stdout.strip()


def _exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def _group_members(pgid: int, daemon_dir: str) -> list[int]:
    """Postfix daemons in process group `pgid` (children stay in the master's group).

    Only processes running a Postfix daemon binary count, so a recycled
    group id can never make us signal someone else's process.
    """
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat_line = (entry / "stat").read_text()
        except OSError:
            continue
        # Field 5 is pgrp; the command name (field 2) may hold spaces, so split after ")".
        fields = stat_line.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and _exe(int(entry.name)).startswith(daemon_dir + "/"):
            members.append(int(entry.name))
    return members


class PostfixServer(PeerProcess):
    """Postfix receiving for `domains` on host:port, delivering to Maildirs under workdir."""

    def __init__(
        self,
        host: str,
        port: int,
        domains: Sequence[str],
        workdir: Path,
        *,
        start_timeout: float = 30.0,
        extra_main_cf: dict[str, str] | None = None,
    ) -> None:
        if not domains:
            raise ValueError("PostfixServer needs at least one domain to receive for")
        self.host = host
        self.port = port
        self.domains = [d.lower().rstrip(".") for d in domains]
        self.workdir = Path(workdir).absolute()  # paths go into configs and /proc checks
        self.start_timeout = start_timeout
        self.extra_main_cf = dict(extra_main_cf or {})
        self.config_dir = self.workdir / "etc"
        self.queue_dir = self.workdir / "queue"
        self.data_dir = self.workdir / "data"
        self.mail_dir = self.workdir / "mail"
        self.log_path = self.workdir / "postfix.log"
        self.ca_path = self.config_dir / "ca.pem"
        self._master_pid: int | None = None
        self._daemon_dir = _daemon_directory()

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    # -- configuration -------------------------------------------------

    def _main_cf(self) -> dict[str, str]:
        etc = self.config_dir
        ipv6 = ":" in self.host
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "mail_owner": MAIL_OWNER,
            "setgid_group": "postdrop",
            "myhostname": HOSTNAME,
            "mydestination": "",
            # Postfix only accepts interface addresses here, and 127.0.0.N is
            # not one; the master.cf service still binds exactly host:port.
            "inet_interfaces": "loopback-only" if ipaddress.ip_address(self.host).is_loopback else self.host,
            "inet_protocols": "ipv6" if ipv6 else "ipv4",
            "mynetworks": "[::1]/128" if ipv6 else "127.0.0.0/8",
            "relay_domains": "",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            # Nothing leaves this instance, not even a bounce.
            "local_transport": "error:local delivery disabled in test peer",
            "default_transport": "error:outbound mail disabled in test peer",
            "relay_transport": "error:outbound mail disabled in test peer",
            "virtual_mailbox_domains": ", ".join(self.domains),
            "virtual_mailbox_base": str(self.mail_dir),
            "virtual_mailbox_maps": f"texthash:{etc / 'vmailbox'}",
            "virtual_uid_maps": f"static:{pwd.getpwnam(DELIVERY_USER).pw_uid}",
            "virtual_gid_maps": f"static:{pwd.getpwnam(DELIVERY_USER).pw_gid}",
            # No permit_mynetworks: loopback clients must not relay either.
            "smtpd_relay_restrictions": "reject_unauth_destination",
            "smtpd_recipient_restrictions": "reject_unauth_destination",
            "smtpd_peername_lookup": "no",
            "smtpd_tls_security_level": "may",
            "smtpd_tls_chain_files": f"{etc / 'key.pem'}, {etc / 'cert.pem'}",
            "smtpd_tls_loglevel": "1",
            "smtpd_tls_received_header": "yes",
            "maillog_file": str(self.log_path),
            "maillog_file_prefixes": str(self.workdir),
            "biff": "no",
            "readme_directory": "no",
            "html_directory": "no",
            "smtpd_banner": "$myhostname ESMTP Postfix test peer",
        }
        settings.update(self.extra_main_cf)
        return settings

    def _write_config(self) -> None:
        postfix = pwd.getpwnam(MAIL_OWNER)
        nobody = pwd.getpwnam(DELIVERY_USER)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o755)
        for d in (self.config_dir, self.queue_dir):
            d.mkdir(exist_ok=True)
            os.chown(d, 0, 0)
            d.chmod(0o755)
        self.data_dir.mkdir(exist_ok=True)
        os.chown(self.data_dir, postfix.pw_uid, postfix.pw_gid)
        self.data_dir.chmod(0o700)
        self.mail_dir.mkdir(exist_ok=True)
        os.chown(self.mail_dir, nobody.pw_uid, nobody.pw_gid)
        self.mail_dir.chmod(0o700)

        main_cf = "".join(f"{k} = {v}\n" for k, v in self._main_cf().items())
        (self.config_dir / "main.cf").write_text(main_cf)
        listen = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        (self.config_dir / "master.cf").write_text(_MASTER_CF.format(listen=listen))
        # Catch-all per domain; a trailing "/" makes it a Maildir.
        (self.config_dir / "vmailbox").write_text("".join(f"@{d} {d}/\n" for d in self.domains))

        if not (self.config_dir / "cert.pem").exists():
            ca = trustme.CA()
            leaf = ca.issue_cert(HOSTNAME, self.host)
            ca.cert_pem.write_to_path(str(self.ca_path))
            leaf.private_key_pem.write_to_path(str(self.config_dir / "key.pem"))
            (self.config_dir / "key.pem").chmod(0o600)
            with (self.config_dir / "cert.pem").open("wb") as f:
                for blob in leaf.cert_chain_pems:
                    f.write(blob.bytes())

    # -- lifecycle -----------------------------------------------------

    def _postfix(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [POSTFIX, "-c", str(self.config_dir), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def check_output(self) -> str:
        try:
            res = self._postfix("check", timeout=30)
        except subprocess.TimeoutExpired:
            return "postfix check timed out"
        return f"exit {res.returncode}\n{res.stdout}{res.stderr}"

    def start(self) -> None:
        if self._master_pid is not None and self._is_our_master(self._master_pid):
            raise RuntimeError(f"Postfix on {self.address} already running (master {self._master_pid})")
        self._write_config()
        require_searchable(self.data_dir, MAIL_OWNER)
        require_searchable(self.queue_dir, MAIL_OWNER)
        require_searchable(self.mail_dir, DELIVERY_USER)
        try:
            res = self._postfix("start", timeout=self.start_timeout)
            started = f"exit {res.returncode}\n{res.stdout}{res.stderr}"
            ok = res.returncode == 0
        except subprocess.TimeoutExpired:
            started, ok = f"postfix start did not finish in {self.start_timeout:.0f}s", False
        try:
            if not ok:
                raise RuntimeError("postfix start failed")
            self._master_pid = self._read_master_pid()
            wait_port(self.host, self.port, self.start_timeout)
            if not holds_listener(self._master_pid, self.port):
                raise RuntimeError(f"port {self.port} answers, but not from master {self._master_pid}")
        except (RuntimeError, TimeoutError, OSError, ValueError) as exc:
            self.stop()
            raise RuntimeError(
                f"Postfix on {self.address} did not start: {exc}\n"
                f"--- postfix start:\n{started}\n--- postfix check:\n{self.check_output()}\n"
                f"--- {self.log_path}:\n{self.log_text()}"
            ) from exc

    def _read_master_pid(self) -> int:
        return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])

    def _is_our_master(self, pid: int) -> bool:
        """True only for a live Postfix master working in *our* queue directory.

        master.pid can be stale and its PID reused; checking the binary and
        the cwd (master chdirs to queue_directory) rules that out.
        """
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            return False
        return _exe(pid) == f"{self._daemon_dir}/master" and Path(cwd) == self.queue_dir.resolve()

    def stop(self, timeout: float = 10.0) -> None:
        """`postfix stop`, then make sure the master and its process group are gone."""
        pid = self._master_pid
        if pid is None:
            try:
                pid = self._read_master_pid()
            except (OSError, ValueError, IndexError):
                pid = None
        self._master_pid = None
        if pid is None or not self._is_our_master(pid):
            return
        with contextlib.suppress(subprocess.TimeoutExpired):  # escalated below
            self._postfix("stop", timeout=timeout)

        def running() -> bool:
            return self._is_our_master(pid) or bool(_group_members(pid, self._daemon_dir))

        deadline = time.monotonic() + timeout
        while running() and time.monotonic() < deadline:
            time.sleep(0.05)
        if running():
            # master called setsid(), so its group id is its PID; kill only
            # processes verified to be Postfix daemons of that group.
            for member in {pid, *_group_members(pid, self._daemon_dir)}:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(member, signal.SIGKILL)
            end = time.monotonic() + 5
            while running() and time.monotonic() < end:
                time.sleep(0.05)
            if running():
                raise RuntimeError(f"Postfix master {pid} for {self.address} survived SIGKILL")

    # -- what the test reads -------------------------------------------

    def mailbox(self, address: str) -> list[bytes]:
        """Raw bytes of every message delivered to `address` (Maildir new/ and cur/), oldest first."""
        _, _, domain = address.rpartition("@")
        maildir = self.mail_dir / domain.lower()
        files: list[Path] = []
        for sub in ("new", "cur"):
            try:
                files.extend(p for p in (maildir / sub).iterdir() if p.is_file())
            except FileNotFoundError:
                continue
        # Maildir names start with the delivery time in seconds; mtime breaks ties.
        files.sort(key=lambda p: (p.stat().st_mtime_ns, p.name))
        parser = email.parser.BytesHeaderParser(policy=email.policy.compat32)
        found = []
        for path in files:
            raw = path.read_bytes()
            delivered_to = parser.parsebytes(raw).get_all("Delivered-To", [])
            if any(str(v).strip().lower() == address.lower() for v in delivered_to):
                found.append(raw)
        return found

    def wait_for_mail(self, address: str, n: int = 1, timeout: float = 20.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while True:
            msgs = self.mailbox(address)
            if len(msgs) >= n:
                return msgs
            if time.monotonic() >= deadline:
                tail = "\n".join(self.log_lines()[-30:])
                raise TimeoutError(
                    f"{address} has {len(msgs)} of {n} messages at Postfix {self.address} "
                    f"after {timeout:.1f}s; log tail:\n{tail}"
                )
            time.sleep(0.05)
