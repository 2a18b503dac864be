"""``host:port`` as the configuration writes it, and what is wrong with a bad one."""

from __future__ import annotations

import pytest

from mta.hostport import parse_host_port


@pytest.mark.parametrize(("text", "default", "expected"), [
    ("127.0.0.1:2525", None, ("127.0.0.1", 2525)),
    ("[::1]:25", None, ("::1", 25)),
    ("mx.example.com", 25, ("mx.example.com", 25)),
    ("::1", 53, ("::1", 53)),
    ("[2001:db8::1]", 53, ("2001:db8::1", 53)),
    (" relay.example.net:587 ", None, ("relay.example.net", 587)),
])
def test_host_and_port(text: str, default: int | None, expected: tuple[str, int]) -> None:
    assert parse_host_port(text, default) == expected


@pytest.mark.parametrize(("text", "default", "reason"), [
    ("nowhere", None, "'nowhere': missing ':port'"),
    (":25", None, "':25': missing host"),
    ("[::1", None, "unclosed '['"),
    ("[::1]25", None, "expected ':port' after ']'"),
    ("host:0", None, "port must be a number from 1 to 65535"),
    ("host:http", 25, "port must be a number from 1 to 65535"),
])
def test_a_bad_address_says_why(text: str, default: int | None, reason: str) -> None:
    with pytest.raises(ValueError, match=reason.replace("[", r"\[")):
        parse_host_port(text, default)
