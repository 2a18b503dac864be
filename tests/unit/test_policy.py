"""Address syntax and relay permission."""

from __future__ import annotations

import ipaddress

import pytest

from mta.policy import address, relay
from mta.replies import Rejected

NETS = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128")]


@pytest.mark.parametrize("text", ["user@example.com", "first.last+tag@sub.example.co.uk", '"quoted name"@example.com',
                                  "user@[192.0.2.1]", "user@bücher.example"])
def test_good_addresses(text: str) -> None:
    assert address.parse(text) is not None


@pytest.mark.parametrize("text", ["", "user", "@example.com", "user@", "user@localhost", "user@exa mple.com",
                                  "us er@example.com", "user@-bad-.com", "user@[999.1.1.1]", "a\r\n@example.com",
                                  "a\x00@example.com", "x" * 65 + "@example.com"])
def test_bad_addresses(text: str) -> None:
    assert address.parse(text) is None
    with pytest.raises(Rejected) as info:
        address.parse_recipient(text)
    assert info.value.reply.code == 501


def test_idn_domain_is_turned_into_a_labels() -> None:
    parsed = address.parse("user@bücher.example")
    assert parsed is not None and parsed.domain == "xn--bcher-kva.example"


def test_null_sender_is_allowed() -> None:
    assert address.parse_sender("<>") is None and address.parse_sender("") is None


@pytest.mark.parametrize(("peer", "trusted"), [(("10.1.2.3", 4000), True), (("11.0.0.1", 4000), False),
                                               (("::ffff:10.0.0.5", 1, 0, 0), True), (("::1", 1, 0, 0), True),
                                               (("::2", 1, 0, 0), False), (None, False)])
def test_trusted_networks(peer: object, trusted: bool) -> None:
    assert relay.is_trusted(peer, NETS) is trusted
    if not trusted:
        with pytest.raises(Rejected) as info:
            relay.check_relay(peer, NETS)
        assert str(info.value.reply) == "554 5.7.1 Relay access denied"
