"""A mailbox at the end of the path: an SMTP receiver that files mail into a Maildir, and a
real Dovecot (Debian's ``dovecot-imapd``) serving that Maildir over IMAPS.

Owns: one ``dovecot -F`` child with a configuration of its own in its work directory
(base and state directories, log, a passwd-file with one user, a ``trustme``
certificate; nothing of the system's Dovecot is used), listening on 127.0.0.1 and a
free port; and one aiosmtpd ``Controller`` on the given address that writes every
message it accepts into the user's Maildir (``mailbox.Maildir``), as a local delivery
agent would.  Dovecot reads the mail as ``nobody``, which owns the Maildir.

How it fails: ``start`` raises RuntimeError with Dovecot's log when it exits or its
port does not answer in time.
"""

from __future__ import annotations

import contextlib
import mailbox
import os
import subprocess
from pathlib import Path
from typing import Any

import trustme
from aiosmtpd.controller import Controller

from .net import free_port, stop_process, wait_port

NOBODY = 65534


class _Deliver:
    def __init__(self, maildir: Path) -> None:
        self.maildir = maildir
        self.delivered = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        box = mailbox.Maildir(self.maildir, create=False)
        key = box.add(bytes(envelope.original_content or envelope.content))
        path = self.maildir / "new" / key
        os.chown(path, NOBODY, NOBODY)
        self.delivered += 1
        return "250 2.0.0 delivered to the mailbox"


class MailboxServer:
    def __init__(self, workdir: Path, smtp_host: str, smtp_port: int, user: str = "probe",
                 password: str = "probe-password") -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        workdir.chmod(0o755)
        self.user, self.password = user, password
        self.imap_port = free_port("127.0.0.1")
        self.ca = trustme.CA()
        self.ca_file = workdir / "imap-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.maildir = workdir / "home" / user / "Maildir"
        self.handler = _Deliver(self.maildir)
        self.controller = Controller(self.handler, hostname=smtp_host, port=smtp_port)
        self.proc: subprocess.Popen[bytes] | None = None

    def _configure(self) -> Path:
        work = self.workdir
        served = self.ca.issue_cert("127.0.0.1", "localhost")
        served.private_key_pem.write_to_path(str(work / "imap-key.pem"))
        served.cert_chain_pems[0].write_to_path(str(work / "imap-cert.pem"))
        for name in ("run", "state"):
            (work / name).mkdir(exist_ok=True)
        self.maildir.parent.mkdir(parents=True, exist_ok=True)
        mailbox.Maildir(self.maildir, create=True)
        for path in [self.maildir.parent.parent, self.maildir.parent, self.maildir,
                     *(self.maildir / sub for sub in ("new", "cur", "tmp"))]:
            os.chown(path, NOBODY, NOBODY)
        users = work / "users"
        users.write_text(f"{self.user}:{{PLAIN}}{self.password}\n")
        users.chmod(0o644)
        conf = work / "dovecot.conf"
        conf.write_text(f"""\
protocols = imap
listen = 127.0.0.1
base_dir = {work}/run
state_dir = {work}/state
log_path = {work}/dovecot.log
ssl = required
ssl_cert = <{work}/imap-cert.pem
ssl_key = <{work}/imap-key.pem
auth_mechanisms = plain
first_valid_uid = 1
service imap-login {{
  chroot =
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    port = {self.imap_port}
    ssl = yes
  }}
}}
service anvil {{
  chroot =
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {users}
}}
userdb {{
  driver = static
  args = uid={NOBODY} gid={NOBODY} home={work}/home/%u
}}
mail_location = maildir:~/Maildir
""")
        return conf

    def start(self) -> MailboxServer:
        conf = self._configure()
        self.proc = subprocess.Popen(["dovecot", "-c", str(conf), "-F"], cwd=self.workdir,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port("127.0.0.1", self.imap_port, timeout=15, proc=self.proc)
        except (TimeoutError, RuntimeError) as exc:
            self.stop()
            log = (self.workdir / "dovecot.log").read_text(errors="replace") if \
                (self.workdir / "dovecot.log").exists() else ""
            raise RuntimeError(f"dovecot did not start: {exc}\n{log}") from None
        self.controller.start()
        return self

    def messages(self) -> int:
        return len(list(mailbox.Maildir(self.maildir, create=False).keys()))

    def stop(self) -> None:
        with contextlib.suppress(AssertionError):  # the receiver was stopped already, or never started
            self.controller.stop()
        stop_process(self.proc)
        self.proc = None
