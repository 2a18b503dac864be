"""chasquid, a receiving MTA of another make, unpacked from its Debian package.

Debian's MTA packages conflict with Postfix, so chasquid is never installed:
``fetch()`` runs ``apt-get download chasquid`` once into a cache under
/var/tmp and unpacks it there with ``dpkg -x``; the binary runs as it is.

Owns: one chasquid process (its own PID), its config directory (config,
TLS certificate, the domain's users), data directory, logs and the
mailbox folder it delivers into under the given workdir, and the three ports it listens on
(SMTP, submission, submission over TLS: 25, 587 and 465 unless given, so
that on shared loopback it can take free ones).  It runs in a private
mount namespace (``unshare -m``) in which /etc/resolv.conf names the test
DNS (on port 53 of that address: resolv.conf has no port), so its SPF
check of each incoming message asks that server and nothing outside.  Its
local delivery agent is ``/bin/sh`` writing each message to
``mail/<user>.<n>`` (renamed into place once complete).

How it fails: ``fetch()`` returns None with the reason when the package
cannot be had; ``start()`` raises RuntimeError with chasquid's log when it
exits or does not listen in time.
"""

from __future__ import annotations

import glob
import subprocess
import time
from pathlib import Path

import trustme

from tests.peers.net import wait_port
from tests.peers.process import PeerProcess

CACHE = Path("/var/tmp/kubemta-e2e-debs")


def fetch() -> tuple[Path | None, str]:
    """The unpacked chasquid binary, downloading the package on first use."""
    binary = CACHE / "chasquid" / "usr" / "bin" / "chasquid"
    if binary.exists():
        return binary, ""
    CACHE.mkdir(parents=True, exist_ok=True)
    CACHE.chmod(0o755)
    if not glob.glob(str(CACHE / "chasquid_*.deb")):
        done = subprocess.run(["apt-get", "download", "chasquid"], cwd=CACHE, capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            return None, f"apt-get download chasquid failed: {done.stderr.strip()[-300:]}"
    deb = sorted(glob.glob(str(CACHE / "chasquid_*.deb")))[-1]
    done = subprocess.run(["dpkg", "-x", deb, str(CACHE / "chasquid")], capture_output=True, text=True, timeout=60)
    if done.returncode != 0 or not binary.exists():
        return None, f"dpkg -x {deb} failed: {done.stderr.strip()}"
    return binary, ""


class Chasquid(PeerProcess):
    def __init__(self, binary: Path, address: str, domain: str, users: list[str], workdir: Path,
                 resolver: str, ca: trustme.CA, ports: tuple[int, int, int] = (25, 587, 465)) -> None:
        self.binary = binary
        self.address = address
        self.port, self.submission_port, self.submission_tls_port = ports
        self.domain = domain
        self.users = users
        self.workdir = workdir
        self.resolver = resolver
        self.ca = ca
        self.hostname = f"mx.{domain}"
        self.mail_dir = workdir / "mail"
        self.log_path = workdir / "chasquid.log"
        self.mail_log = workdir / "mail.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def _configure(self) -> Path:
        etc = self.workdir / "etc"
        certs = etc / "certs" / self.hostname
        certs.mkdir(parents=True, exist_ok=True)
        (etc / "domains" / self.domain).mkdir(parents=True, exist_ok=True)
        self.mail_dir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "data").mkdir(exist_ok=True)
        leaf = self.ca.issue_cert(self.hostname, self.address)
        leaf.private_key_pem.write_to_path(str(certs / "privkey.pem"))
        with (certs / "fullchain.pem").open("wb") as out:
            for blob in leaf.cert_chain_pems:
                out.write(blob.bytes())
        # Written under a hidden name and renamed when complete, so a reader never sees a message half-written.
        deliver = (f'n=0; while [ -e "{self.mail_dir}/$1.$n" ]; do n=$((n+1)); done; '
                   f'cat > "{self.mail_dir}/.$1.$n.part" && mv "{self.mail_dir}/.$1.$n.part" "{self.mail_dir}/$1.$n"')
        (etc / "chasquid.conf").write_text(
            f'hostname: "{self.hostname}"\n'
            f'smtp_address: "{self.address}:{self.port}"\n'
            f'submission_address: "{self.address}:{self.submission_port}"\n'
            f'submission_over_tls_address: "{self.address}:{self.submission_tls_port}"\n'
            f'data_dir: "{self.workdir / "data"}"\n'
            f'mail_log_path: "{self.mail_log}"\n'
            'mail_delivery_agent_bin: "/bin/sh"\n'
            f'mail_delivery_agent_args: "-c"\n'
            f"mail_delivery_agent_args: '{deliver}'\n"
            'mail_delivery_agent_args: "mda"\n'
            'mail_delivery_agent_args: "%to_user%"\n'
        )
        for user in self.users:
            done = subprocess.run([str(self.binary.parent / "chasquid-util"), f"--configdir={etc}", "user-add",
                                   f"{user}@{self.domain}", "--password=not-used-here"],
                                  capture_output=True, text=True, timeout=30)
            if done.returncode != 0:
                raise RuntimeError(f"chasquid-util user-add failed: {done.stdout}{done.stderr}")
        (self.workdir / "resolv.conf").write_text(f"nameserver {self.resolver}\noptions timeout:2 attempts:1\n")
        return etc

    def start(self, timeout: float = 20.0) -> None:
        """Start chasquid; call it inside the host's network namespace."""
        etc = self._configure()
        script = (f'mount --bind "{self.workdir / "resolv.conf"}" /etc/resolv.conf && '
                  f'exec "{self.binary}" -config_dir "{etc}" -logfile "{self.log_path}" -v 1')
        with (self.workdir / "stderr").open("ab") as err:
            self._proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                                          stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        try:
            wait_port(self.address, self.port, timeout)
        except (RuntimeError, TimeoutError) as exc:
            self.stop()
            raise RuntimeError(f"chasquid did not come up: {exc}\n{self.log_text()}") from exc


    def log_text(self) -> str:
        parts = []
        for path in (self.workdir / "stderr", self.log_path, self.mail_log):
            try:
                parts.append(path.read_text(errors="replace"))
            except FileNotFoundError:
                continue
        return "\n".join(parts)

    def logs(self) -> dict[str, Path]:
        return {"mx-other/chasquid": self.log_path, "mx-other/chasquid-mail.log": self.mail_log}

    def mailbox(self, user: str) -> list[bytes]:
        return [p.read_bytes() for p in sorted(self.mail_dir.glob(f"{user}.*"))]

    def wait_for_mail(self, user: str, timeout: float = 30.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.mailbox(user)
            if found:
                return found
            if time.monotonic() >= deadline:
                raise TimeoutError(f"nothing for {user}@{self.domain} at chasquid after {timeout}s:\n"
                                   f"{self.log_text()[-3000:]}")
            time.sleep(0.1)
