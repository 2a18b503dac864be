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

