"""The pieces of the outbound TLS policy that need no network: MTA-STS parsing, MX matching, the STARTTLS memory."""

from __future__ import annotations

from pathlib import Path

import pytest

from mta.delivery.mtasts import PolicyInvalid, StsPolicy, parse_policy, parse_txt
from mta.delivery.seen import StartTlsSeen


def test_txt_record_gives_the_id_of_exactly_one_stsv1_record() -> None:
    assert parse_txt(["v=STSv1; id=20160831085700Z;"]) == "20160831085700Z"
    assert parse_txt(["v=spf1 -all", "v=STSv1;id=abc"]) == "abc"
    assert parse_txt(["v=STSv1; id=1", "v=STSv1; id=2"]) is None, "two records: no policy (RFC 8461 §3.1)"
    assert parse_txt(["v=STSv1; id=not-alnum!"]) is None
    assert parse_txt(["v=STSv1;"]) is None


def test_policy_parses_and_rejects_what_the_rfc_rejects() -> None:
    policy = parse_policy("version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\n"
                          "max_age: 604800\r\n", "id1", 1000.0)
    assert policy == StsPolicy("enforce", ("mail.example.com", "*.example.net"), 604800, "id1", 1000.0)
    assert policy.expires == 1000.0 + 604800
    for bad in ("version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 1\n",
                "version: STSv1\nmode: strict\nmx: a.example\nmax_age: 1\n",
                "version: STSv1\nmode: enforce\nmax_age: 1\n",
                "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 99999999999\n",
                "version: STSv1\nmode: enforce\nmx: a..example\nmax_age: 1\n",
                "<html>not a policy</html>\n"):
        with pytest.raises(PolicyInvalid):
            parse_policy(bad, "id", 0.0)
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 10\n", "x", 0).mode == "none"


def test_mx_patterns_match_one_leftmost_label_only() -> None:
    policy = StsPolicy("enforce", ("mx.example.com", "*.example.net"), 1, "i", 0)
    assert policy.matches("MX.example.com.") and policy.matches("a.example.net")
    assert not policy.matches("b.a.example.net"), "a wildcard stands for exactly one label"
    assert not policy.matches("example.net") and not policy.matches("mx.example.org")


def test_starttls_memory_expires_survives_and_shrugs_off_a_corrupt_file(tmp_path: Path) -> None:
    now = [1_000_000.0]
    path = tmp_path / "tls" / "seen.json"
    seen = StartTlsSeen(path, 3600, write_interval=0, clock=lambda: now[0])
    assert not seen.required("example.com")
    seen.record("example.com")
    assert seen.required("example.com")
    assert StartTlsSeen(path, 3600, clock=lambda: now[0]).required("example.com"), "kept on disk"
    now[0] += 3601
    assert not StartTlsSeen(path, 3600, clock=lambda: now[0]).required("example.com"), "remembered only so long"
    assert not StartTlsSeen(path, 0, clock=lambda: now[0]).required("example.com"), "0 turns it off"
    path.write_text("{not json")
    assert not StartTlsSeen(path, 3600).required("example.com")


def test_starttls_memory_keeps_at_most_max_domains(tmp_path: Path) -> None:
    now = [0.0]
    seen = StartTlsSeen(tmp_path / "seen.json", 10**9, max_domains=3, write_interval=0, clock=lambda: now[0])
    for n in range(5):
        now[0] += 1
        seen.record(f"d{n}.example")
    reloaded = StartTlsSeen(tmp_path / "seen.json", 10**9, clock=lambda: now[0])
    assert [reloaded.required(f"d{n}.example") for n in range(5)] == [False, False, True, True, True]


def test_config_names_the_key_of_a_bad_tls_policy() -> None:
    from mta import config

    loaded = config.load(None, {"MTA__TLS_POLICY": '[{match: [Bank.Example, "*.bank.example"], level: verify}]'})
    assert loaded.tls_policy[0].match == ["bank.example", "*.bank.example"] and loaded.delivery.tls_level == "may"
    with pytest.raises(config.ConfigError, match=r"tls_policy\.0\.level: level 'dane' needs dns\.dnssec"):
        config.load(None, {"MTA__TLS_POLICY": "[{match: [a.example], level: dane}]"})
    with pytest.raises(config.ConfigError, match=r"tls_policy\.0\.level"):
        config.load(None, {"MTA__TLS_POLICY": "[{match: [a.example], level: strict}]"})
    with pytest.raises(config.ConfigError, match="more than one tls_policy rule"):
        config.load(None, {"MTA__TLS_POLICY": "[{match: [a.example], level: verify}, {match: [a.example], "
                                              "level: may}]"})
    assert config.load(None, {"MTA__DNS__DNSSEC": "true", "MTA__DELIVERY__TLS_LEVEL": "dane"}).delivery.tls_level \
        == "dane"


def test_dane_matching_of_ee_and_ta_records() -> None:
    import hashlib

    import trustme
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from mta.delivery.dane import Tlsa, matches

    root = trustme.CA()
    intermediate = root.create_child_ca()
    leaf_pem, *rest = intermediate.issue_cert("mx.example.net").cert_chain_pems
    chain = [x509.load_pem_x509_certificate(leaf_pem.bytes())] + [
        x509.load_pem_x509_certificate(item.bytes()) for item in rest]
    der = [cert.public_bytes(Encoding.DER) for cert in chain]
    spki = chain[0].public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    assert matches([Tlsa(3, 1, 1, hashlib.sha256(spki).digest())], der, ["mx.example.net"]) is None
    assert matches([Tlsa(3, 0, 2, hashlib.sha512(der[0]).digest())], der, ["any.name"]) is None, "EE: no names"
    assert matches([Tlsa(3, 0, 0, der[0])], der, []) is None
    assert matches([Tlsa(3, 1, 1, b"\0" * 32)], der, ["mx.example.net"]) is not None
    anchor = Tlsa(2, 0, 1, hashlib.sha256(der[1]).digest())
    assert matches([anchor], der, ["mx.example.net"]) is None
    assert "does not verify" in (matches([anchor], der, ["other.example.net"]) or ""), "TA: the name counts"
    assert matches([Tlsa(2, 0, 1, hashlib.sha256(der[0]).digest())], der, ["mx.example.net"]) is not None, \
        "the leaf itself is no trust anchor"
    assert matches([Tlsa(1, 0, 1, hashlib.sha256(der[0]).digest())], der, ["mx.example.net"]) is not None, \
        "PKIX usages are not used for SMTP"
    assert matches([Tlsa(3, 1, 1, hashlib.sha256(spki).digest())], [], ["mx.example.net"]) is not None
