"""Provider presets: what ``routes[].provider`` fills in, what the route overrides, what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from mta import config
from mta.config import ConfigError
from mta.delivery.client import route_credentials
from mta.delivery.providers import MB, PROVIDERS


def route(tmp_path: Path, text: str) -> config.RouteConfig:
    path = tmp_path / "mta.yaml"
    path.write_text(f"routes:\n  - {text}\n")
    return config.load(path, environ={}).routes[0]


@pytest.mark.parametrize(
    ("preset", "relay", "auth_user", "size", "throttles"),
    [
        ("provider: sendgrid", "smtp.sendgrid.net:587", "apikey", None, False),
        ("{provider: mailgun, region: us}", "smtp.mailgun.org:587", None, 25 * MB, False),
        ("{provider: mailgun, region: eu}", "smtp.eu.mailgun.org:587", None, 25 * MB, False),
        ("{provider: ses, region: eu-west-1}", "email-smtp.eu-west-1.amazonaws.com:587", None, None, True),
        ("{provider: ses, region: us-gov-west-1}", "email-smtp.us-gov-west-1.amazonaws.com:587", None, None, True),
        ("provider: postmark", "smtp.postmarkapp.com:587", None, 10 * MB, False),
        ("provider: mandrill", "smtp.mandrillapp.com:587", None, None, False),
    ],
)
def test_every_provider_fills_in_host_port_tls_and_limits(tmp_path: Path, preset: str, relay: str,
                                                          auth_user: str | None, size: int | None,
                                                          throttles: bool) -> None:
    body = preset.strip("{}")
    r = route(tmp_path, "{domains: ['*'], " + body + "}")
    assert r.relay == relay and r.relay_host_port[1] == 587
    assert r.tls == "starttls" and r.tls_verify is True
    assert r.auth_user == auth_user and r.max_message_size == size
    assert bool(r.throttle_texts) is throttles


def test_every_preset_cites_its_documentation() -> None:
    assert set(PROVIDERS) == {"sendgrid", "mailgun", "ses", "postmark", "mandrill"}
    assert all(p.docs.startswith(("https://", "http://")) for p in PROVIDERS.values())


def test_explicit_route_keys_win_over_the_preset(tmp_path: Path) -> None:
    r = route(tmp_path, "{domains: ['*'], provider: sendgrid, relay: 'smtp.sendgrid.net:2525', "
                        "auth_user: someone, max_message_size: 5M, tls: implicit, throttle_texts: [busy]}")
    assert r.relay_host_port == ("smtp.sendgrid.net", 2525) and r.tls == "implicit"
    assert r.auth_user == "someone" and r.max_message_size == 5 * MB and r.throttle_texts == ["busy"]
    r = route(tmp_path, "{domains: ['*'], provider: ses, region: us-east-1, throttle_texts: []}")
    assert r.throttle_texts == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{domains: ['*'], provider: sendmail}", "routes.0: provider: 'sendmail' is not a known provider"),
        ("{domains: ['*'], provider: ses}", "routes.0: region: provider 'ses' needs a region"),
        ("{domains: ['*'], provider: ses, region: mars}", "region: 'mars' is not an AWS region name"),
        ("{domains: ['*'], provider: mailgun}", "region: provider 'mailgun' needs a region: us or eu"),
        ("{domains: ['*'], provider: mailgun, region: asia}", "region: provider 'mailgun' has no region 'asia'"),
        ("{domains: ['*'], provider: mailgun, region: asia, relay: 'x.example:587'}", "has no region 'asia'"),
        ("{domains: ['*'], provider: postmark, region: eu}", "region: provider 'postmark' has one host"),
        ("{domains: ['*'], relay: 'x.example:25', region: eu}", "region: only a route with a provider"),
        ("{domains: ['*']}", "relay: a route needs relay (host:port) or provider"),
        ("{domains: ['*'], provider: sendgrid, messages_per_second: 0}", "routes.0.messages_per_second"),
        ("{domains: ['*'], provider: sendgrid, auth_user: ''}", "routes.0.auth_user"),
    ],
)
def test_bad_provider_settings_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        route(tmp_path, text)
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("preset", "secret", "login"),
    [
        ("provider: sendgrid", "SG.key", ("apikey", "SG.key")),
        ("provider: postmark", "server-token", ("server-token", "server-token")),
        ("provider: mandrill", "ops@example.com:md-key", ("ops@example.com", "md-key")),
        ("provider: ses, region: us-east-1", "AKIAEXAMPLE:c2VjcmV0", ("AKIAEXAMPLE", "c2VjcmV0")),
        ("provider: sendgrid", "apikey:SG.key", ("apikey", "SG.key")),
    ],
)
def test_the_secret_is_read_after_the_providers_user_name_convention(
        tmp_path: Path, preset: str, secret: str, login: tuple[str, str]) -> None:
    secret_file = tmp_path / "login"
    secret_file.write_text(secret + "\n")
    r = route(tmp_path, "{domains: ['*'], " + preset + f", auth_file: {secret_file}}}")
    assert route_credentials(r) == login


def test_a_plain_route_still_wants_user_and_password(tmp_path: Path) -> None:
    secret_file = tmp_path / "login"
    secret_file.write_text("just-a-key\n")
    r = route(tmp_path, f"{{domains: ['*'], relay: 'x.example:587', auth_file: {secret_file}}}")
    with pytest.raises(ValueError, match="expected 'username:password'"):
        route_credentials(r)
