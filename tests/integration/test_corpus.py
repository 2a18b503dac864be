"""Real-world messages the project did not write, through a real ``mta serve``.

The corpus is CPython's email test data as Debian ships it
(``libpython3.11-testsuite``: ``test/test_email/data/msg_*.txt``, 47 messages
collected from real mail over the years: Postfix-delivered mail, mailing-list
digests, DSNs, broken MIME, long header lines, mbox ``From `` lines, 8-bit
text).  Every message is submitted over SMTP, must be accepted, delivered to
a receiver that records the raw bytes, carry a DKIM signature that Perl's
Mail::DKIM verifies against a real DNS server, keep every part's decoded
content, and have no line over 998 octets.
"""

from __future__ import annotations

import email
import email.policy
import smtplib
import subprocess
from pathlib import Path

from mta.message import normalise
from tests.ci import require
from tests.conftest import World
from tests.peers.recorder import Recorder

CORPUS = Path("/usr/lib/python3.11/test/test_email/data")
VERIFIER = Path(__file__).parent.parent / "tools" / "dkimverify.pl"


def leaf_contents(data: bytes) -> list[bytes]:
    message = email.message_from_bytes(data, policy=email.policy.compat32)
    return [part.get_payload(decode=True) or b"" for part in message.walk() if not part.is_multipart()]


def as_sent(data: bytes) -> bytes:
    """The DATA smtplib sends for ``data``: bytes are not touched, but a final CRLF is added when missing
    (a file ending in a bare LF arrives with one more line end)."""
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def test_a_public_corpus_is_accepted_delivered_signed_and_kept(world: World) -> None:
    files = sorted(CORPUS.glob("msg_*.txt"))
    require(len(files) >= 40, f"the corpus in {CORPUS} (Debian package libpython3.11-testsuite) is missing")
    key_path = world.dkim_key("corpus", "sender.test")
    with Recorder() as recorder:
        server = world.mta({
            "delivery": {"port": recorder.port}, "limits": {"max_line_length": 1048576},
            "dkim": {"keys": [{"domain": "sender.test", "selector": "corpus", "key_file": str(key_path)}],
                     "fallback_domain": "sender.test"},
        })
        refused = {}
        for path in files:
            try:
                with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
                    client.ehlo("app.kubemta.test")
                    client.sendmail("app@sender.test", [f"{path.stem}@[127.0.0.1]"], path.read_bytes())
            except (smtplib.SMTPException, OSError) as exc:
                refused[path.name] = str(exc)
        assert not refused, refused
        try:
            got = recorder.wait_for(len(files), timeout=60)
        except TimeoutError as exc:
            lost = [line for line in server.log().splitlines()
                    if any(f'"event":"{e}"' in line for e in ("deferred", "bounced", "rejected"))]
            raise AssertionError(f"{exc}; {lost[-5:]}") from None
        arrived = {m.rcpt_tos[0].split("@")[0]: m for m in got}
        server.wait_queue_empty(timeout=60)
    assert sorted(arrived) == [path.stem for path in files]
    problems = []
    for path in files:
        received = arrived[path.stem].data
        verdict = subprocess.run(["perl", str(VERIFIER), world.dns.host, str(world.dns.port)], input=received,
                                 capture_output=True, timeout=30, check=False).stdout.decode()
        if "rsa-sha256 pass sender.test corpus" not in verdict:
            problems.append(f"{path.name}: DKIM {verdict.strip()!r}")
        if max(len(line) for line in received.split(b"\r\n")) > 998:
            problems.append(f"{path.name}: a line over 998 octets")
        if leaf_contents(received) != leaf_contents(normalise(as_sent(path.read_bytes()))):
            problems.append(f"{path.name}: decoded content changed")
    assert not problems, "\n".join(problems)
