"""The domain-pattern matcher behind routes, shaping rules and DKIM signing domains."""

from __future__ import annotations

from mta.domains import DomainMap, normalise


def test_exact_beats_nearest_wildcard_beats_any() -> None:
    table = DomainMap([("*", "default"), ("*.example.com", "below example"),
                       ("*.eu.example.com", "below eu"), ("eu.example.com", "eu itself")])
    assert table.lookup("eu.example.com") == "eu itself"
    assert table.lookup("mail.eu.example.com") == "below eu"
    assert table.lookup("a.b.eu.example.com") == "below eu"
    assert table.lookup("us.example.com") == "below example"
    assert table.lookup("example.com") == "default"  # a wildcard covers only names below it
    assert table.lookup("example.net") == "default"


def test_case_and_trailing_dot_do_not_matter() -> None:
    table = DomainMap([("Example.COM.", 1), ("*.Mail.Example.com", 2)])
    assert table.lookup("EXAMPLE.com.") == 1
    assert table.lookup("mx.MAIL.example.COM.") == 2
    assert normalise("Example.COM.") == "example.com"


def test_nothing_matches_without_a_default() -> None:
    table = DomainMap([("example.com", 1), ("*.example.com", 2)])
    assert table.lookup("example.org") is None
    assert table.lookup("") is None
    assert table.lookup("com") is None


def test_the_first_entry_for_a_pattern_stays() -> None:
    table: DomainMap[str] = DomainMap()
    for pattern, value in [("a.test", "first"), ("A.test.", "second"), ("*", "x"), ("*", "y"),
                           ("*.b.test", "one"), ("*.B.test", "two")]:
        table.add(pattern, value)
    assert table.lookup("a.test") == "first"
    assert table.lookup("c.test") == "x"
    assert table.lookup("z.b.test") == "one"



def wide(text: str) -> str:
    """``text`` in full-width forms, as East Asian input methods type it (U+FF01..U+FF5E)."""
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)


def test_unicode_spellings_are_one_name() -> None:
    spellings = ["bücher.example", "BÜCHER.example.", wide("BÜCHER.example"), "xn--bcher-kva.example",
                 "bu\u0308cher.example" + wide(".")]
    assert {normalise(name) for name in spellings} == {"xn--bcher-kva.example"}
    assert normalise(wide("EXAMPLE.com")) == "example.com"
    assert normalise("*.Bücher.example") == "*.xn--bcher-kva.example"
    assert normalise("[192.0.2.1]") == "[192.0.2.1]"


def test_routes_shaping_and_dkim_keys_match_every_spelling(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from mta.config import Config
    from mta.delivery.route import Router
    from mta.dkim import keys
    from mta.dkim.signer import Signer
    from mta.scheduler.shaping import Shaper

    config = Config.model_validate({
        "routes": [{"domains": [wide("bücher.example")], "relay": "relay.example.net:587"}],
        "shaping": {"rules": [{"match": ["*.BÜCHER.example"], "max_connections": 2}]},
    })
    router = Router(config.routes)
    for spelling in ("bücher.example", "BÜCHER.EXAMPLE.", "xn--bcher-kva.example"):
        assert router.next_hop(spelling).kind == "relay", spelling
    assert router.next_hop(wide("EXAMPLE.com")).name == "example.com"
    shaper = Shaper(config.shaping, 10, 100)
    assert shaper.connections(router.next_hop(wide("MAIL.") + "bücher.example").name) == 2
    assert shaper.connections(router.next_hop("mail.other.example").name) == 10
    path = tmp_path / "k.pem"
    keys.write_private_key(keys.generate("ed25519"), path)
    signer = Signer([keys.SigningKey.load("bücher.example", "s1", path)])
    signed = signer.sign("From: Shop <info@BÜCHER.example>\r\nSubject: x\r\n\r\nbody\r\n".encode())
    assert signed.startswith(b"DKIM-Signature:")
