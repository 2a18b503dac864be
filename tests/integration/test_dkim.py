"""DKIM signing end to end: keys from `mta dkim keygen`, published in a real DNS
server, signatures checked by independent verifiers (Perl's Mail::DKIM for
RSA; dkimpy, which this project uses only for canonicalisation, for Ed25519)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import dkim
import dns.resolver
import pytest

from tests.conftest import RECORDS, World
from tests.harness import send_mail

VERIFIER = Path(__file__).parent.parent / "tools" / "dkimverify.pl"


def keygen(world: World, selector: str, kind: str, domain: str = "sender.test") -> tuple[Path, str]:
    out = world.root / f"{selector}.pem"
    done = subprocess.run([sys.executable, "-P", "-m", "mta.cli", "dkim", "keygen", "--domain", domain,
                           "--selector", selector, "--type", kind, "--out", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return out, done.stdout.strip()


@pytest.fixture
def signed_world(world: World):  # type: ignore[no-untyped-def]
    rsa_file, rsa_record = keygen(world, "rsa2026", "rsa")
    ed_file, ed_record = keygen(world, "ed2026", "ed25519")
    world.dns.replace_records([*RECORDS, rsa_record, ed_record])
    server = world.mta({"dkim": {"keys": [
        {"domain": "sender.test", "selector": "rsa2026", "key_file": str(rsa_file)},
        {"domain": "sender.test", "selector": "ed2026", "key_file": str(ed_file)},
    ]}})
    return world, server


def test_signed_mail_verifies_with_independent_verifiers(signed_world) -> None:  # type: ignore[no-untyped-def]
    world, server = signed_world
    sink = world.sink("dest")
    send_mail(server.port, "app@sender.test", ["user@dest.test"], body="Invoice attached.\r\n\r\nThanks\r\n")
    [message] = sink.wait_for_messages(1, timeout=20)
    data = message.data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert data.count(b"DKIM-Signature:") == 2
    if shutil.which("perl") and subprocess.run(["perl", "-MMail::DKIM::Verifier", "-e", "1"]).returncode == 0:
        verdict = subprocess.run(["perl", str(VERIFIER), world.dns.host, str(world.dns.port)], input=data,
                                 capture_output=True, timeout=30)
        lines = verdict.stdout.decode().splitlines()
        assert "rsa-sha256 pass sender.test rsa2026" in lines, verdict.stdout + verdict.stderr
    else:
        pytest.fail("Mail::DKIM (libmail-dkim-perl) is needed to verify signatures independently")
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [world.dns.host]
    resolver.port = world.dns.port

    def lookup(name: bytes, timeout: int = 5) -> bytes:
        answer = resolver.resolve(name.decode(), "TXT")
        return b"".join(b"".join(r.strings) for r in answer)

    for index in range(2):
        assert dkim.DKIM(data).verify(idx=index, dnsfunc=lookup), f"signature {index} does not verify"


def test_unusable_key_stops_start_up_with_a_clear_message(world: World) -> None:
    bad = world.root / "bad.pem"
    bad.write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    server = world.mta({"dkim": {"keys": [{"domain": "sender.test", "selector": "x", "key_file": str(bad)}]}},
                       start=False)
    done = server.cli("serve")
    assert done.returncode == 1 and "dkim.keys" in done.stderr and "not a PEM private key" in done.stderr
    missing = world.mta({"dkim": {"keys": [{"domain": "sender.test", "selector": "x",
                                            "key_file": str(world.root / "absent.pem")}]}}, name="m", start=False)
    done = missing.cli("check-config")
    assert done.returncode == 2 and "dkim.keys.0.key_file" in done.stderr


def test_a_key_others_can_read_draws_a_warning_at_start(world: World) -> None:
    key_file, _ = keygen(world, "loose", "rsa")
    key_file.chmod(0o644)
    server = world.mta({"dkim": {"keys": [{"domain": "sender.test", "selector": "loose", "key_file": str(key_file)}]}})
    [warning] = [line for line in server.log().splitlines() if '"event":"secret_file_readable"' in line]
    assert '"key":"dkim.keys.0.key_file"' in warning and '"mode":"0644"' in warning
