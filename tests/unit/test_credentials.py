"""The credentials file: hashes, verification cost, reload, atomic updates."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mta.auth.credentials import Credentials, CredentialsError, hash_password, parse, set_password


def test_add_verify_change(tmp_path: Path) -> None:
    path = tmp_path / "users"
    set_password(path, "app", "first password", create=True)
    creds = Credentials(path)
    assert creds.verify("app", "first password") and not creds.verify("app", "wrong")
    set_password(path, "app", "second password", create=False)
    assert creds.verify("app", "second password")  # reloaded on change
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(CredentialsError, match="already exists"):
        set_password(path, "app", "x" * 10, create=True)
    with pytest.raises(CredentialsError, match="not in"):
        set_password(path, "ghost", "x" * 10, create=False)


def test_unknown_user_costs_a_full_hash(tmp_path: Path) -> None:
    path = tmp_path / "users"
    set_password(path, "app", "a password", create=True)
    creds = Credentials(path)

    def cost(user: str) -> float:
        start = time.perf_counter()
        assert not creds.verify(user, "wrong")
        return time.perf_counter() - start

    known = min(cost("app") for _ in range(3))
    unknown = min(cost("nobody") for _ in range(3))
    # Skipping the hash for unknown names would make them ~1000x cheaper.
    assert unknown > 0.5 * known


def test_bad_files_name_the_line(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match=":2: expected"):
        parse("# users\nnot a valid line\n", "users")
    with pytest.raises(CredentialsError, match="not a \\$scrypt\\$ hash"):
        parse("app:plaintext\n", "users")
    encoded = hash_password("pw", log_n=10)
    with pytest.raises(CredentialsError, match="appears twice"):
        parse(f"app:{encoded}\napp:{encoded}\n", "users")


def test_a_broken_update_keeps_the_previous_users(tmp_path: Path) -> None:
    path = tmp_path / "users"
    set_password(path, "app", "a password", create=True)
    creds = Credentials(path)
    path.write_text("garbage\n")
    assert creds.verify("app", "a password")


def test_the_file_is_rewritten_durably_with_nothing_left_beside_it(tmp_path: Path,
                                                                   disk_journal: list[tuple[str, Path]]) -> None:
    path = tmp_path / "users"
    set_password(path, "app", "a password", create=True)
    assert [kind for kind, _ in disk_journal] == ["fsync", "rename", "fsync"]
    assert disk_journal[1:] == [("rename", path), ("fsync", tmp_path.resolve())]
    assert [p.name for p in tmp_path.iterdir()] == ["users"]
