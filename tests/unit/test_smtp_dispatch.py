"""aiosmtpd builds the same dispatch tables from the short ``dir()`` as from a full one."""

from __future__ import annotations

import asyncio
import inspect

from mta.config import Config
from mta.smtp.server import KubemtaSMTP, Listener
from mta.smtp.session import SessionHandler


def full_names(obj: object, prefix: str) -> set[str]:
    return {name for name in object.__dir__(obj) if name.startswith(prefix)}


def test_commands_mechanisms_and_hooks_match_a_full_dir() -> None:
    config = Config.model_validate({"hostname": "mta.kubemta.test", "listeners": [
        {"name": "relay", "address": "127.0.0.1:2525", "mode": "relay", "trusted_networks": ["127.0.0.0/8"]}]})

    async def build() -> KubemtaSMTP:
        handler = object.__new__(SessionHandler)  # its tables depend on the class only
        return Listener(config.listeners[0], config, handler)._protocol()

    protocol = asyncio.run(build())
    handler = protocol.event_handler
    assert set(protocol._smtp_methods) == {n.removeprefix("smtp_") for n in full_names(protocol, "smtp_")}
    assert set(protocol._handle_hooks) == {n.removeprefix("handle_") for n in full_names(handler, "handle_")}
    # aiosmtpd names a mechanism by the method's attribute, or derives it from the method name.
    expected_auth = {getattr(m, "__auth_mechanism_name__", n.replace("auth_", "").replace("__", "-"))
                     for obj in (protocol, handler) for n, m in inspect.getmembers(type(obj)) if n.startswith("auth_")}
    assert set(protocol._auth_methods) == expected_auth
    assert {"DATA", "EHLO", "MAIL", "RCPT", "STARTTLS", "AUTH"} <= set(protocol._smtp_methods)
    assert {"LOGIN", "PLAIN"} <= set(protocol._auth_methods)


PATHS = [
    "<a@b.test>", "<a@b.test> SIZE=100 BODY=8BITMIME", "<first.last+tag@sub.example.com>", "<a@b.test>SIZE=1",
    "<x!#$%&'*+/=?^_`{|}~-@b.test>", "<a..b@b.test>", "<.a@b.test>", "<a.@b.test>", "<\"quoted local\"@b.test>",
    "<a@[127.0.0.1]>", "<a@b..test>", "<a@-b.test>", "<a@b.test", "a@b.test", "<>", "< a@b.test>",
    "<@relay.test:a@b.test>", "<ü@b.test>", "<a@bü.test>", "<" + "l" * 70 + "@b.test>", "<a@b.test> <c@d.test>",
    "<a@b.test>  (comment) SIZE=1", "<a@b.test>\tSIZE=2", "",
]


def test_simple_paths_parse_as_aiosmtpd_parses_them() -> None:
    from aiosmtpd.smtp import SMTP

    from mta import replies

    config = Config.model_validate({"hostname": "mta.kubemta.test", "listeners": [
        {"name": "relay", "address": "127.0.0.1:2525", "mode": "relay", "trusted_networks": ["127.0.0.0/8"]}]})

    async def build() -> KubemtaSMTP:
        return Listener(config.listeners[0], config, object.__new__(SessionHandler))._protocol()

    protocol = asyncio.run(build())
    protocol.local_part_limit = 64
    for path in PATHS:
        expected = SMTP._getaddr(protocol, path)
        if expected[0] is None:
            try:
                got = protocol._getaddr(path)
            except replies.Rejected:
                continue
            raise AssertionError(f"{path!r}: aiosmtpd refuses it, ours gave {got!r}")
        assert protocol._getaddr(path) == expected, path
