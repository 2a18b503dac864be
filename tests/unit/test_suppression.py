"""The suppression list's store: scopes, expiry, replacement, and several processes at once."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from mta.config import SuppressionConfig
from mta.suppression import SuppressionList, scope_for


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def make(path: Path, clock: Clock | None = None, **settings: object) -> SuppressionList:
    store = SuppressionList(path, SuppressionConfig.model_validate(settings), clock or Clock())
    store.open()
    return store


def test_addresses_are_found_whatever_their_case_and_only_in_their_scope(tmp_path: Path) -> None:
    store = make(tmp_path / "s.db")
    store.add("Dead@Dest.test", "invalid_recipient", "bounce", "550 5.1.1 no such user")
    store.add("mine@dest.test", "complaint", "arf", scope="domain:sender.test")
    store.add("acct@dest.test", "manual", "operator", scope="account:alice")
    assert store.lookup("dead@dest.TEST").reason == "invalid_recipient"  # type: ignore[union-attr]
    assert store.lookup("mine@dest.test") is None
    assert store.lookup("mine@dest.test", "other.test") is None
    assert store.lookup("mine@dest.test", "Sender.test") is not None
    assert store.lookup("acct@dest.test", "sender.test", "bob") is None
    assert store.lookup("acct@dest.test", None, "alice") is not None


def test_entries_expire_per_reason(tmp_path: Path) -> None:
    clock = Clock()
    store = make(tmp_path / "s.db", clock, expiry={"invalid_domain": "1h", "complaint": "never"})
    domain = store.add("a@gone.test", "invalid_domain", "bounce")
    complaint = store.add("b@dest.test", "complaint", "arf")
    assert domain.expires == clock.now + 3600 and complaint.expires is None
    clock.now += 3599
    assert store.lookup("a@gone.test") is not None
    clock.now += 2
    assert store.lookup("a@gone.test") is None
    assert store.lookup("b@dest.test") is not None
    assert [e.address for e in store.entries()] == ["b@dest.test"]
    assert len(store.entries(include_expired=True)) == 2
    assert store.purge_expired() == 1


def test_adding_again_renews_the_entry_and_remove_ends_it(tmp_path: Path) -> None:
    clock = Clock()
    store = make(tmp_path / "s.db", clock)
    store.add("x@dest.test", "invalid_recipient", "bounce", "first")
    clock.now += 10
    store.add("x@dest.test", "invalid_recipient", "bounce", "second")
    [entry] = store.entries("x@dest.test")
    assert (entry.detail, entry.created) == ("second", clock.now)
    assert store.remove("x@dest.test") == 1
    assert store.lookup("x@dest.test") is None
    assert store.remove("x@dest.test") == 0


def test_bad_reason_or_scope_is_refused(tmp_path: Path) -> None:
    store = make(tmp_path / "s.db")
    with pytest.raises(ValueError, match="reason"):
        store.add("x@dest.test", "reputation", "bounce")
    with pytest.raises(ValueError, match="scope"):
        store.add("x@dest.test", "manual", "operator", scope="domain:")


def test_scope_for_follows_the_setting() -> None:
    assert scope_for("global", "app@Sender.test", "alice") == "global"
    assert scope_for("sending_domain", "app@Sender.test", None) == "domain:sender.test"
    assert scope_for("account", "app@sender.test", "alice") == "account:alice"
    assert scope_for("account", "app@sender.test", None) == "global"  # no account: for everyone


def _writer(path: str, worker: int, count: int) -> None:
    store = SuppressionList(Path(path), SuppressionConfig())
    for i in range(count):
        store.add(f"user{worker}-{i}@dest.test", "invalid_recipient", "bounce")
        assert store.lookup(f"user{worker}-{i}@dest.test") is not None


def test_processes_write_and_read_one_file_at_once(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    make(path)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_writer, args=(str(path), n, 50)) for n in range(4)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=120)
        assert process.exitcode == 0
    assert len(make(path).entries()) == 200
