"""Secret files that group or others can read are found, with their config key."""

from __future__ import annotations

from pathlib import Path

from mta.config import Config
from mta.dkim import keys
from mta.secret_files import readable_by_others, secret_files


def test_loose_secret_files_are_named_with_their_key(tmp_path: Path) -> None:
    dkim = tmp_path / "dkim.pem"
    keys.write_private_key(keys.generate("ed25519"), dkim)  # 0600
    relay = tmp_path / "relay"
    relay.write_text("user:password\n")
    relay.chmod(0o644)
    hook = tmp_path / "hook"
    hook.write_text("k\n")
    hook.chmod(0o640)
    config = Config.model_validate({
        "dkim": {"keys": [{"domain": "example.com", "selector": "s1", "key_file": str(dkim)}]},
        "routes": [{"domains": ["*"], "relay": "smtp.example.net:587", "auth_file": str(relay)}],
        "webhooks": {"endpoints": [{"name": "crm", "url": "https://hooks.example/x", "secret_file": str(hook)}]},
    })
    assert {key for key, _ in secret_files(config)} == {
        "dkim.keys.0.key_file", "routes.0.auth_file", "webhooks.endpoints.0.secret_file"}
    assert [(key, mode) for key, _, mode in readable_by_others(config)] == [
        ("routes.0.auth_file", 0o644), ("webhooks.endpoints.0.secret_file", 0o640)]
