"""DKIM signing: byte-identical to dkimpy for RSA, verifiable for RSA and Ed25519, domain choice."""

from __future__ import annotations

import random
import time
from pathlib import Path

import dkim
import dkim.util
import pytest
from cryptography.hazmat.primitives import serialization
from dkim.canonicalization import CanonicalizationPolicy

from mta.dkim import keys
from mta.dkim.signer import Signer, SigningError, canonical_body, include_headers, parse, signature_header

MESSAGE = (b"From: Billing <billing@example.com>\r\nTo: someone@example.net\r\nSubject: Invoice  42\r\n"
           b"Date: Sat, 28 Nov 2026 10:00:00 +0000\r\nMessage-ID: <a@example.com>\r\n\r\n"
           b"Hello,\r\n\r\n  trailing white space   \r\n\r\n\r\n")


def make_key(tmp_path: Path, kind: str, name: str, pkcs1: bool = False) -> Path:
    key = keys.generate(kind, 2048)
    path = tmp_path / name
    fmt = serialization.PrivateFormat.TraditionalOpenSSL if pkcs1 else serialization.PrivateFormat.PKCS8
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()))
    return path


def dns_for(*signing_keys: keys.SigningKey):  # type: ignore[no-untyped-def]
    records = {f"{k.selector}._domainkey.{k.domain}.".encode(): keys.txt_record(k.key).encode() for k in signing_keys}
    return lambda name, timeout=5: records.get(name)


def test_rsa_signature_is_byte_identical_to_dkimpy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_key(tmp_path, "rsa", "rsa.pem", pkcs1=True)
    key = keys.SigningKey.load("example.com", "s2026", path)
    now = 1_790_000_000
    ours = signature_header(parse(MESSAGE), key, now=now)
    monkeypatch.setattr(time, "time", lambda: now)
    headers, _ = dkim.rfc822_parse(MESSAGE)
    theirs = dkim.sign(MESSAGE, b"s2026", b"example.com", path.read_bytes(), canonicalize=(b"relaxed", b"relaxed"),
                       include_headers=include_headers(headers))
    assert ours == theirs


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_signature_verifies(tmp_path: Path, kind: str) -> None:
    key = keys.SigningKey.load("example.com", "sel", make_key(tmp_path, kind, f"{kind}.pem"))
    signed = Signer([key]).sign(MESSAGE)
    assert dkim.verify(signed, dnsfunc=dns_for(key))


def test_dual_signing_and_from_is_oversigned(tmp_path: Path) -> None:
    rsa_key = keys.SigningKey.load("example.com", "r", make_key(tmp_path, "rsa", "r.pem"))
    ed_key = keys.SigningKey.load("example.com", "e", make_key(tmp_path, "ed25519", "e.pem"))
    signed = Signer([rsa_key, ed_key]).sign(MESSAGE)
    assert signed.count(b"DKIM-Signature:") == 2
    assert b"a=rsa-sha256" in signed and b"a=ed25519-sha256" in signed
    headers, _ = dkim.rfc822_parse(signed)
    tags = dkim.util.parse_tag_value(headers[0][1])
    signed_names = [h.strip() for h in tags[b"h"].replace(b"\r\n", b"").split(b":")]
    assert signed_names.count(b"from") == 2 and signed_names.count(b"to") == 2
    for index in range(2):
        assert dkim.DKIM(signed).verify(idx=index, dnsfunc=dns_for(rsa_key, ed_key))
    # A second From: added in transit breaks the signature.
    tampered = signed.replace(b"From: Billing", b"From: evil@attacker.example\r\nFrom: Billing", 1)
    assert not dkim.verify(tampered, dnsfunc=dns_for(rsa_key, ed_key))


def test_signing_domain_is_from_domain_or_parent_or_fallback(tmp_path: Path) -> None:
    parent = keys.SigningKey.load("example.com", "p", make_key(tmp_path, "ed25519", "p.pem"))
    fallback = keys.SigningKey.load("relay.example.org", "f", make_key(tmp_path, "ed25519", "f.pem"))
    signer = Signer([parent, fallback], fallback_domain="relay.example.org")
    assert signer.keys_for(parse(b"From: a@mail.example.com\r\n\r\n")[0]) == [parent]
    assert signer.keys_for(parse(b"From: a@other.test\r\n\r\n")[0]) == [fallback]
    assert Signer([parent]).keys_for(parse(b"From: a@other.test\r\n\r\n")[0]) == []
    assert Signer([parent]).sign(b"From: a@other.test\r\n\r\nx\r\n") == b"From: a@other.test\r\n\r\nx\r\n"


def test_bad_key_files_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(keys.DkimKeyError, match="not a PEM private key"):
        keys.load_private_key(tmp_path / "junk.pem")
    with pytest.raises(keys.DkimKeyError, match="cannot read"):
        keys.load_private_key(tmp_path / "absent.pem")


def test_key_reload_and_failure_keeps_previous(tmp_path: Path) -> None:
    path = make_key(tmp_path, "ed25519", "k.pem")
    key = keys.SigningKey.load("example.com", "k", path)
    first = keys.public_value(key.key)
    replacement = make_key(tmp_path, "ed25519", "k2.pem")
    path.write_bytes(replacement.read_bytes())
    key.refresh()
    assert keys.public_value(key.key) != first
    second = keys.public_value(key.key)
    path.write_text("broken")
    key.refresh()
    assert keys.public_value(key.key) == second


def test_signing_failure_is_an_error_not_an_unsigned_message(tmp_path: Path) -> None:
    key = keys.SigningKey.load("example.com", "k", make_key(tmp_path, "ed25519", "k.pem"))
    key.domain = "exämple.com"  # cannot be encoded into the d= tag
    with pytest.raises(SigningError):
        Signer([key]).sign(MESSAGE.replace(b"example.com", "exämple.com".encode()))


BODY_PIECES = [b"a", b".", b" ", b"\t", b"\r\n", b"  ", b"\n", b"\r", b"x y"]


def test_parse_and_body_canonicalisation_match_dkimpy() -> None:
    rng = random.Random(6376)
    headers = b"From: a@example.com\r\nSubject: folded\r\n  on two lines\r\nTo: b@example.net\r\n"
    for _ in range(3000):
        body = b"".join(rng.choice(BODY_PIECES) for _ in range(rng.randrange(0, 12)))
        message = headers + b"\r\n" + body
        assert parse(message) == tuple(dkim.rfc822_parse(message)), message
        assert canonical_body(body) == CanonicalizationPolicy.from_c_value(b"relaxed/relaxed").canonicalize_body(
            body), body
    for odd in (b"", b"\r\nbody only\r\n", b"From: a@b\r\n", b"From: a@b\nTo: c@d\n\nbare LF\n"):
        assert parse(odd) == tuple(dkim.rfc822_parse(odd)), odd


def test_a_new_key_file_is_durable_private_and_never_overwritten(tmp_path: Path,
                                                                 disk_journal: list[tuple[str, Path]]) -> None:
    path = tmp_path / "sel.key"
    key = keys.generate("ed25519")
    keys.write_private_key(key, path)
    assert keys.public_value(keys.load_private_key(path)) == keys.public_value(key)
    assert path.stat().st_mode & 0o777 == 0o600
    assert [kind for kind, _ in disk_journal] == ["fsync", "link", "fsync"]
    assert disk_journal[-1] == ("fsync", tmp_path.resolve())
    with pytest.raises(FileExistsError):
        keys.write_private_key(keys.generate("ed25519"), path)
    assert keys.public_value(keys.load_private_key(path)) == keys.public_value(key)
    assert [p.name for p in tmp_path.iterdir()] == ["sel.key"]


def test_a_header_dkimpy_cannot_parse_is_a_signing_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from mta.dkim import keys
    from mta.dkim.signer import Signer, SigningError

    path = tmp_path / "k.pem"
    keys.write_private_key(keys.generate("ed25519"), path)
    signer = Signer([keys.SigningKey.load("example.com", "s1", path)], "example.com")
    # CPython's test corpus msg_35: no separator, a body line read as a header.
    message = b"From: a@example.com\r\nSubject: x\r\ncounter to RFC 2822, no separating newline\r\n"
    with pytest.raises(SigningError, match="cannot be parsed"):
        signer.sign(message)
