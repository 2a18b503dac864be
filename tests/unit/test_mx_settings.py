"""The per-attempt MX bounds: their config keys, defaults and validation, and
how ``mta serve`` hands them to the connector."""

from __future__ import annotations

from pathlib import Path

import pytest

from mta import config
from mta.app import App
from mta.config import ConfigError
from mta.delivery.client import ClientSettings


def test_defaults() -> None:
    cfg = config.load(environ={})
    assert cfg.delivery.max_mx_hosts == 10 and cfg.delivery.max_mx_addresses == 20
    assert cfg.dns.attempt_timeout == 30.0
    settings = ClientSettings(helo_name="mta.example.com")
    assert (settings.max_mx_hosts, settings.max_mx_addresses, settings.dns_attempt_timeout) == (10, 20, 30.0)


def test_the_connector_gets_the_configured_bounds(tmp_path: Path) -> None:
    cfg = config.load(environ={"MTA__SPOOL__PATH": str(tmp_path), "MTA__DELIVERY__MAX_MX_HOSTS": "3",
                               "MTA__DELIVERY__MAX_MX_ADDRESSES": "4", "MTA__DNS__ATTEMPT_TIMEOUT": "12s"})
    settings = App(cfg)._connector().settings
    assert (settings.max_mx_hosts, settings.max_mx_addresses, settings.dns_attempt_timeout) == (3, 4, 12.0)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"MTA__DELIVERY__MAX_MX_HOSTS": "0"}, "delivery.max_mx_hosts"),
        ({"MTA__DELIVERY__MAX_MX_ADDRESSES": "0"}, "delivery.max_mx_addresses"),
        ({"MTA__DNS__ATTEMPT_TIMEOUT": "0s"}, "dns.attempt_timeout"),
        ({"MTA__DNS__ATTEMPT_TIMEOUT": "soon"}, "dns.attempt_timeout: 'soon' is not a duration"),
    ],
)
def test_bad_bounds_name_the_key(environ: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(environ=environ)
    assert expected in str(info.value)
