"""Configuration: defaults, YAML, environment overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from mta import config
from mta.config import ConfigError


def test_embedded_default_is_a_loopback_relay_on_2525() -> None:
    cfg = config.load(environ={})
    assert [(item.name, item.address, item.mode) for item in cfg.listeners] == [("relay", "127.0.0.1:2525", "relay")]
    assert str(cfg.spool.path) == "var/spool"
    assert cfg.delivery.port == 25
    assert cfg.queue.retry_initial == 300 and cfg.queue.retry_max == 3600 and cfg.queue.lifetime == 5 * 86400
    assert "." in cfg.hostname


def test_yaml_file_and_environment_overrides(tmp_path: Path) -> None:
    path = tmp_path / "mta.yaml"
    path.write_text(
        "hostname: mta.example.com\n"
        "spool: {path: /var/spool/kubemta}\n"
        "listeners:\n"
        "  - {name: submission, address: '0.0.0.0:587', mode: submission, trusted_networks: [10.0.0.0/8]}\n"
        "dns: {nameservers: ['127.0.0.1:5353', '::1']}\n"
        "delivery: {port: 2525, source_address: 192.0.2.10}\n"
        "routes:\n"
        "  - {domains: ['*'], relay: 'smtp.example.net:587', tls: starttls}\n"
        "http: {address: '0.0.0.0:8080'}\n"
        "queue: {lifetime: 2d, retry_initial: 1m}\n"
    )
    cfg = config.load(path, environ={"MTA__DELIVERY__PORT": "2600", "MTA__LISTENERS__0__TRUSTED_NETWORKS":
                                     "[10.1.0.0/16, '::1/128']"})
    assert cfg.delivery.port == 2600
    assert [str(n) for n in cfg.listeners[0].trusted_networks] == ["10.1.0.0/16", "::1/128"]
    assert cfg.dns.servers == [("127.0.0.1", 5353), ("::1", 53)]
    assert cfg.queue.lifetime == 2 * 86400 and cfg.queue.retry_initial == 60
    assert cfg.routes[0].relay_host_port == ("smtp.example.net", 587)
    assert str(cfg.delivery.source_address) == "192.0.2.10"


def test_mta_config_variable_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("hostname: from-env.example.com\n")
    assert config.load(environ={"MTA_CONFIG": str(path)}).hostname == "from-env.example.com"


@pytest.mark.parametrize(
    ("text", "environ", "expected"),
    [
        ("delivery: {prot: 25}\n", {}, "delivery.prot: unknown key (did you mean 'port'?)"),
        ("listeners: [{name: a, address: '127.0.0.1:25', mode: relya}]\n", {}, "listeners.0.mode"),
        ("listeners: [{name: a, address: 'nowhere'}]\n", {}, "listeners.0.address"),
        ("queue: {lifetime: soon}\n", {}, "queue.lifetime: 'soon' is not a duration"),
        ("delivery: {port: 70000}\n", {}, "delivery.port"),
        ("dns: {nameservers: [dns.example.com]}\n", {}, "dns.nameservers"),
        ("hostname: not_a_host\n", {}, "hostname:"),
        ("routes: [{domains: ['bad domain'], relay: 'x.example:25'}]\n", {}, "routes.0.domains"),
        ("routes: [{domains: ['*'], relay: 'x.example:25', auth_file: /nonexistent/creds}]\n", {},
         "routes.0.auth_file: /nonexistent/creds is not a readable file"),
        ("listeners: [{name: a, address: '127.0.0.1:25'}, {name: a, address: '127.0.0.1:26'}]\n", {},
         "listener names must be unique"),
        ("- just a list\n", {}, "the top level must be a mapping"),
        ("key: [unclosed\n", {}, "not valid YAML"),
        ("http_api: {address: '0.0.0.0:8443'}\n", {}, "http_api.keys_file: required when address is set"),
        ("listeners: [{name: a, address: '127.0.0.1:2587', mode: submission, auth: {}}]\n", {},
         "listeners.0.auth.credentials_file: required"),
        ("feedback: {domain: bounces.example.com}\n", {}, "feedback.secret_file: required with domain"),
        ("listeners: [{name: f, address: '127.0.0.1:2526', mode: feedback}]\n", {},
         "listeners.0.mode: 'feedback' takes reports for feedback.domain: set it"),
        ("feedback: {domain: bounces.example.com, secret_file: /etc/hostname}\n"
         "listeners: [{name: f, address: '127.0.0.1:2526', mode: feedback, trusted_networks: [10.0.0.0/8]}]\n", {},
         "listeners.0: a feedback listener relays nothing"),
        ("feedback: {esp: {mailgun: {signing_key_file: /etc/hostname}}}\n", {},
         "feedback.esp: provider events are posted to the HTTP API: set http_api.address"),
        ("feedback: {esp: {ses: {topic_arns: [ses-events]}}}\n", {},
         "feedback.esp.ses.topic_arns: 'ses-events' is not an SNS topic ARN"),
        ("feedback: {esp: {ses: {topic_arns: []}}}\n", {}, "feedback.esp.ses.topic_arns"),
        ("feedback: {esp: {sendgrid: {public_key_file: /nonexistent/key}}}\n", {},
         "feedback.esp.sendgrid.public_key_file: /nonexistent/key is not a readable file"),
        ("feedback: {esp: {sparkpost: {}}}\n", {}, "feedback.esp.sparkpost"),
        ("http_api: {address: 'nowhere', keys_file: /tmp/keys}\n", {}, "http_api.address"),
        ("http_api: {address: '0.0.0.0:8443', keys_file: /nonexistent/dir/keys}\n", {},
         "http_api.keys_file: directory /nonexistent/dir does not exist"),
        ("", {"MTA__DELIVERY__PORT": "many"}, "delivery.port"),
        ("", {"MTA__LISTENERS__5__NAME": "x"}, "MTA__LISTENERS__5__NAME"),
    ],
)
def test_bad_config_names_the_key_and_reason(tmp_path: Path, text: str, environ: dict[str, str],
                                             expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        config.load(path, environ=environ)
    assert expected in str(info.value)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        config.load(tmp_path / "absent.yaml", environ={})


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), (45, 45), ("500ms", 0.5), ("5m", 300), ("1h", 3600),
                                               ("5d", 432000)])
def test_durations(text: object, seconds: float) -> None:
    assert config._duration(text) == seconds


@pytest.mark.parametrize(("text", "size"), [(1000, 1000), ("512K", 524288), ("25M", 26214400), ("1GiB", 1 << 30)])
def test_sizes(text: object, size: int) -> None:
    assert config._size(text) == size


def test_the_validated_tree_survives_its_json_form(tmp_path: Path) -> None:
    """Worker processes get the main process's configuration as JSON (mta.workers)."""
    key = tmp_path / "dkim.pem"
    key.write_text("not checked here")
    users = tmp_path / "users"
    users.write_text("")
    production = Path(__file__).parents[2] / "kustomize/overlays/production/mta.yaml"
    extra = tmp_path / "extra.yaml"
    extra.write_text(f"""
hostname: mta.example.com
workers: 2
spool: {{path: {tmp_path / "spool"}, sync: fsync}}
listeners:
  - {{name: relay, address: "127.0.0.1:2525", mode: relay, trusted_networks: [10.0.0.0/8]}}
  - {{name: sub, address: "127.0.0.1:2587", mode: submission, auth: {{credentials_file: {users}}}}}
dkim: {{keys: [{{domain: example.com, selector: s1, key_file: {key}}}]}}
identity:
  pods: {{mta-0: {{source_address: 192.0.2.10, hostname: mta0.example.com}}}}
routes: [{{domains: ["*"], relay: "smtp.example.net:587", tls: starttls}}]
""")
    for path in (production, extra):
        loaded = config.load(path, {"POD_NAME": "mta-0"})
        assert config.Config.model_validate_json(loaded.model_dump_json()) == loaded, path
    assert config.load(extra, {"POD_NAME": "mta-0"}).hostname == "mta0.example.com"


def test_drain_tls_needs_its_files_and_names_them(tmp_path: Path) -> None:
    path = tmp_path / "mta.yaml"
    path.write_text("drain: {listen: 127.0.0.1:8025, secret_file: /s, tls: {cert_file: /nonexistent.crt}}\n")
    with pytest.raises(ConfigError) as caught:
        config.load(path, environ={})
    message = str(caught.value)
    assert "drain.tls.cert_file: /nonexistent.crt is not a readable file" in message, message
    assert "drain.tls.key_file" in message and "drain.tls.ca_file" in message, message
    for name in ("tls.crt", "tls.key", "ca.crt"):
        (tmp_path / name).write_text("x")
    path.write_text(f"drain: {{listen: 127.0.0.1:8025, secret_file: /s, tls: {{cert_file: {tmp_path}/tls.crt, "
                    f"key_file: {tmp_path}/tls.key, ca_file: {tmp_path}/ca.crt}}}}\n")
    loaded = config.load(path, environ={})
    assert loaded.drain.tls is not None and loaded.drain.tls.client_ca_file is None
    # The keys of earlier versions load as they did: no tls, plain signed HTTP.
    path.write_text("drain: {listen: 127.0.0.1:8025, secret_file: /s, peer_address: 'x-{ordinal}:8025', timeout: 1m}\n")
    assert config.load(path, environ={}).drain.tls is None
