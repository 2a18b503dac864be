"""What an operator touches first: config checking, start-up errors, health endpoints, the embedded default."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import World
from tests.harness import send_mail
from tests.peers.net import free_port, wait_port


def mta(*args: str, cwd: Path, env: dict[str, str] | None = None,
        timeout: float = 30) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MTA")}
    return subprocess.run([sys.executable, "-P", "-m", "mta.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**base, **(env or {})})


def test_check_config_accepts_a_good_file_and_names_a_typo(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("hostname: mta.example.com\nlisteners:\n  - {name: sub, address: '0.0.0.0:587', "
                    "mode: submission, trusted_networks: [10.0.0.0/8]}\n")
    done = mta("check-config", "-c", str(good), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["listeners"][0]["mode"] == "submission"
    bad = tmp_path / "bad.yaml"
    bad.write_text("hostname: mta.example.com\ndelivery:\n  sorce_address: 192.0.2.1\n")
    done = mta("check-config", "-c", str(bad), cwd=tmp_path)
    assert done.returncode == 2
    assert "delivery.sorce_address: unknown key (did you mean 'source_address'?)" in done.stderr
    done = mta("serve", "-c", str(bad), cwd=tmp_path)
    assert done.returncode == 2 and "sorce_address" in done.stderr


def test_environment_overrides_reach_the_server(tmp_path: Path) -> None:
    done = mta("check-config", cwd=tmp_path, env={"MTA__DELIVERY__PORT": "2526", "MTA__HOSTNAME": "env.example.com"})
    assert done.returncode == 0
    tree = json.loads(done.stdout)
    assert tree["delivery"]["port"] == 2526 and tree["hostname"] == "env.example.com"
    done = mta("check-config", cwd=tmp_path, env={"MTA__DELIVERY__PORT": "twenty-five"})
    assert done.returncode == 2 and "delivery.port" in done.stderr


def test_port_in_use_is_a_clear_start_up_error(world: World) -> None:
    server = world.mta()
    other = world.mta({"listeners": [{"name": "clash", "address": f"127.0.0.1:{server.port}", "mode": "relay",
                                      "trusted_networks": ["127.0.0.0/8"]}]}, name="other", start=False)
    done = other.cli("serve")
    assert done.returncode == 1
    assert f"listener 'clash' cannot listen on 127.0.0.1:{server.port}" in done.stderr


def test_health_endpoints(world: World) -> None:
    server = world.mta()
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/healthz", timeout=5) as response:
        assert json.loads(response.read()) == {"status": "ok"}
    status, body = server.readyz()
    assert status == 200
    assert body["checks"]["listeners"]["ok"] and body["checks"]["spool"]["ok"]


def test_embedded_default_runs_from_an_empty_directory(tmp_path: Path) -> None:
    """``mta serve`` with no config: loopback relay on 2525, spool under ./var/spool."""
    if not _free(2525) or not _free(8080):
        pytest.skip("ports 2525/8080 are taken on this machine")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTA")}
    # Only DNS is pointed somewhere: at a loopback port nobody answers on, so
    # the test never sends a query off this machine.
    env["MTA__DNS__NAMESERVERS"] = f"[127.0.0.1:{free_port()}]"
    # The message's delivery waits on that silent DNS; the stop need not wait the default 25 s for it.
    env["MTA__SHUTDOWN__TIMEOUT"] = "1s"
    proc = subprocess.Popen([sys.executable, "-P", "-m", "mta.cli", "serve"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_port("127.0.0.1", 2525, timeout=20, proc=proc)
        queue_id = send_mail(2525, "app@example.com", ["someone@example.invalid"])
        assert (tmp_path / "var" / "spool" / "0").is_dir()
        assert queue_id
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == 0


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True



def test_check_config_into_a_closed_pipe_ends_without_a_traceback(tmp_path: Path) -> None:
    """``mta check-config | head``: the reader is gone before the writer writes (closed here at once)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MTA")}
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([sys.executable, "-P", "-m", "mta.cli", "check-config"], cwd=tmp_path,
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=30, env=base)
    finally:
        os.close(write_end)
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert done.returncode == 1


def test_check_config_loads_the_files_serve_would_refuse(tmp_path: Path) -> None:
    bad_key = tmp_path / "dkim.pem"
    bad_key.write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    cert = tmp_path / "tls.crt"
    cert.write_text("not a certificate\n")
    credentials = tmp_path / "users"
    credentials.write_text("billing:plaintext-password\n")
    relay_login = tmp_path / "relay"
    relay_login.write_text("no colon here\n")
    drain_secret = tmp_path / "drain"
    drain_secret.write_text("short\n")
    for path in (bad_key, cert, credentials, relay_login, drain_secret):
        path.chmod(0o600)
    config = tmp_path / "mta.yaml"
    config.write_text(f"""hostname: mta.example.com
listeners:
  - name: sub
    address: 127.0.0.1:2587
    mode: submission
    tls: {{cert_file: {cert}, key_file: {cert}}}
    auth: {{credentials_file: {credentials}}}
dkim:
  keys: [{{domain: example.com, selector: s1, key_file: {bad_key}}}]
routes: [{{domains: ["*"], relay: "smtp.esp.example:587", auth_file: {relay_login}}}]
drain: {{secret_file: {drain_secret}}}
http_api: {{address: "127.0.0.1:2588", keys_file: {credentials}, tls: {{cert_file: {cert}, key_file: {cert}}}}}
""")
    done = mta("check-config", "-c", str(config), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    for key in ("listeners.0.tls", "listeners.0.auth.credentials_file", "dkim.keys.0.key_file",
                "routes.0.auth_file", "drain.secret_file", "http_api.keys_file", "http_api.tls"):
        assert f"\n{key}: " in done.stderr, (key, done.stderr)
    assert "configuration OK" not in done.stderr
    served = mta("serve", "-c", str(config), cwd=tmp_path)
    assert served.returncode == 1  # what check-config refused, serve refuses too


def test_check_config_warns_about_secret_files_others_can_read(tmp_path: Path) -> None:
    secret = tmp_path / "drain"
    secret.write_text("s" * 32 + "\n")
    secret.chmod(0o644)
    config = tmp_path / "mta.yaml"
    config.write_text(f"hostname: mta.example.com\ndrain: {{secret_file: {secret}}}\n")
    done = mta("check-config", "-c", str(config), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "warning: drain.secret_file" in done.stderr and "0644" in done.stderr
    assert "configuration OK" in done.stderr
