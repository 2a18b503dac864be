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
