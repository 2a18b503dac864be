"""The spool library on a real filesystem: durability protocol, loading, quarantine, locking."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spool import Recipient, Record, Spool, SpoolError, SpoolLocked
from spool.commit import Committer
from spool.ids import new_id
from spool.record import DELIVERED, RecordError, loads
from spool.store import DEFERRED, HOLD, INCOMING


def make_record(rcpts: tuple[str, ...] = ("a@example.test",)) -> Record:
    now = time.time()
    return Record(id=new_id(), sender="s@example.test", recipients=[Recipient(r) for r in rcpts],
                  created=now, expires=now + 3600, next_attempt=now, size=0)


@pytest.fixture(params=["syncfs", "fsync"])
def spool(tmp_path: Path, request: pytest.FixtureRequest):
    store = Spool(tmp_path / "spool", request.param)
    store.open()
    yield store
    store.close()


def reopen(spool: Spool):
    spool.close()
    fresh = Spool(spool.root, spool.sync)
    return fresh, fresh.open()


def test_sync_modes() -> None:
    kernel = tuple(int(part) for part in os.uname().release.split("-")[0].split(".")[:2])
    committer = Committer(sync="syncfs")
    try:
        # syncfs reports write-back errors from Linux 5.8 on; before, each file is fsynced.
        assert committer.sync == ("syncfs" if kernel >= (5, 8) else "fsync")
    finally:
        committer.close()
    with pytest.raises(ValueError, match="sync must be one of"):
        Committer(sync="never")


def test_store_writes_message_and_metadata_and_loads_back(spool: Spool) -> None:
    stored = spool.store_blocking(b"Subject: x\r\n\r\nbody\r\n", make_record(("a@x.test", "b@y.test")))
    assert stored.size == len(b"Subject: x\r\n\r\nbody\r\n")
    assert (spool.root / "incoming" / f"{stored.id}.json").exists()
    assert spool.read_message(stored.id) == b"Subject: x\r\n\r\nbody\r\n"
    meta = json.loads((spool.root / "incoming" / f"{stored.id}.json").read_text())
    assert meta["format"] == 1 and meta["sender"] == "s@example.test"
    assert [r["address"] for r in meta["recipients"]] == ["a@x.test", "b@y.test"]
    spool, loaded = reopen(spool)
    try:
        assert [r.id for r in loaded.records] == [stored.id]
        assert loaded.records[0].recipients[1].address == "b@y.test"
        assert loaded.corrupt == []
    finally:
        spool.close()


def test_save_moves_between_states_and_keeps_one_metadata_file(spool: Spool) -> None:
    stored = spool.store_blocking(b"x\r\n", make_record())
    stored.recipients[0].state = DELIVERED
    deferred = spool.save_blocking(stored, DEFERRED)
    assert deferred.revision == 2 and deferred.state == DEFERRED
    held = spool.save_blocking(deferred, HOLD)
    files = sorted(p.relative_to(spool.root).as_posix() for p in spool.root.rglob("*.json"))
    assert files == [f"hold/{stored.id}.json"]
    assert held.revision == 3
    spool, loaded = reopen(spool)
    try:
        assert loaded.records[0].state == HOLD
        assert loaded.records[0].recipients[0].state == DELIVERED
    finally:
        spool.close()


def test_remove_deletes_both_files(spool: Spool) -> None:
    stored = spool.store_blocking(b"x\r\n", make_record())
    spool.remove_blocking(stored)
    assert list((spool.root / "msg").iterdir()) == []
    assert list(spool.root.rglob("*.json")) == []


def test_duplicate_metadata_after_crash_keeps_newest_revision(spool: Spool) -> None:
    stored = spool.store_blocking(b"x\r\n", make_record())
    old = (spool.root / "incoming" / f"{stored.id}.json").read_bytes()
    spool.save_blocking(stored, DEFERRED)
    # Simulate a crash between the rename into deferred/ and the unlink from incoming/.
    (spool.root / "incoming" / f"{stored.id}.json").write_bytes(old)
    spool, loaded = reopen(spool)
    try:
        assert [(r.id, r.state, r.revision) for r in loaded.records] == [(stored.id, DEFERRED, 2)]
        assert not (spool.root / "incoming" / f"{stored.id}.json").exists()
    finally:
        spool.close()


@pytest.mark.parametrize(
    "damage",
    ["garbage-json", "truncated-json", "empty-json", "truncated-message", "empty-message", "missing-message",
     "wrong-format", "id-mismatch"],
)
def test_damaged_files_are_quarantined_and_the_rest_loads(spool: Spool, damage: str) -> None:
    good = spool.store_blocking(b"good\r\n", make_record())
    bad = spool.store_blocking(b"this message is damaged\r\n", make_record())
    meta = spool.root / "incoming" / f"{bad.id}.json"
    msg = spool.root / "msg" / bad.id
    if damage == "garbage-json":
        meta.write_bytes(b"\x00\xffnot json")
    elif damage == "truncated-json":
        meta.write_bytes(meta.read_bytes()[:40])
    elif damage == "empty-json":
        meta.write_bytes(b"")
    elif damage == "truncated-message":
        msg.write_bytes(b"this mess")
    elif damage == "empty-message":
        msg.write_bytes(b"")
    elif damage == "missing-message":
        msg.unlink()
    elif damage == "wrong-format":
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "format": 99}))
    elif damage == "id-mismatch":
        meta.rename(spool.root / "incoming" / f"{new_id()}.json")
    spool, loaded = reopen(spool)
    try:
        assert [r.id for r in loaded.records] == [good.id]
        assert loaded.corrupt, "the damaged file must be reported"
        assert any((spool.root / "corrupt").iterdir())
        assert spool.read_message(good.id) == b"good\r\n"
    finally:
        spool.close()


def test_message_without_metadata_was_never_committed_and_is_removed(spool: Spool) -> None:
    (spool.root / "msg" / new_id()).write_bytes(b"half written")
    spool, loaded = reopen(spool)
    try:
        assert loaded.records == [] and loaded.removed_uncommitted == 1
        assert list((spool.root / "msg").iterdir()) == []
    finally:
        spool.close()


def test_a_load_after_take_leaves_mail_stored_since_to_its_writer(spool: Spool) -> None:
    """``mta serve`` takes the spool, starts listening, then loads: what the listeners store meanwhile
    (even a message file whose metadata is not written yet) is not the loader's."""
    old = make_record()
    spool.store_blocking(b"old", old)
    (spool.root / "msg" / new_id()).write_bytes(b"never committed")
    spool.close()
    fresh = Spool(spool.root, spool.sync)
    cutoff = fresh.take()
    try:
        new = make_record()
        fresh.store_blocking(b"new", new)
        half = new_id()
        (fresh.root / "msg" / half).write_bytes(b"metadata on its way")
        loaded = fresh.load(cutoff)
        assert [r.id for r in loaded.records] == [old.id] and loaded.removed_uncommitted == 1
        assert (fresh.root / "msg" / half).exists() and (fresh.root / "incoming" / f"{new.id}.json").exists()
        assert loaded.corrupt == []
    finally:
        fresh.close()


def test_a_failed_write_keeps_nothing(spool: Spool) -> None:
    first = spool.store_blocking(b"one\r\n", make_record())
    again = make_record()
    again.id = first.id  # the message file exists: O_EXCL fails mid-change
    with pytest.raises(SpoolError):
        spool.store_blocking(b"two\r\n", again)
    assert spool.read_message(first.id) == b"one\r\n"
    assert list((spool.root / "tmp").iterdir()) == []


def test_second_owner_is_refused_while_first_lives_and_allowed_after_kill(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys,time; from spool import Spool; Spool(sys.argv[1]).open(); "
         "print('open', flush=True); time.sleep(60)", str(root)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        second = Spool(root)
        assert second.in_use()
        with pytest.raises(SpoolLocked, match="in use by process"):
            second.open()
    finally:
        holder.kill()
        holder.wait(timeout=10)
    # The kernel drops a flock with its process, even after kill -9.
    third = Spool(root)
    assert not third.in_use()
    third.open()
    third.close()


def age(spool: Spool, record: Record, seconds: float) -> None:
    meta = spool.root / INCOMING / f"{record.id}.json"
    then = time.time() - seconds
    os.utime(meta, (then, then))


def test_unannounced_finds_what_attached_processes_stored_and_nobody_announced(
        spool: Spool, caplog: pytest.LogCaptureFixture) -> None:
    attached = Spool(spool.root, spool.sync)
    attached.attach()
    try:
        announced, orphan, young, damaged = (attached.store_blocking(b"m\r\n", make_record()) for _ in range(4))
    finally:
        attached.close()
    for record in (announced, orphan, damaged):
        age(spool, record, 60)
    (spool.root / INCOMING / f"{damaged.id}.json").write_text("{not json")
    age(spool, damaged, 60)
    (spool.root / INCOMING / "stray.txt").write_text("not metadata")
    deferred = spool.save_blocking(spool.store_blocking(b"d\r\n", make_record()), DEFERRED)
    known = {announced.id}

    found = spool.unannounced(known, min_age=10)
    assert [r.id for r in found] == [orphan.id]
    assert found[0].state == INCOMING and found[0].sender == orphan.sender
    assert f"queue_id={damaged.id} unreadable" in caplog.text
    # Left where it is: quarantine is the loader's job, at the next open.
    assert (spool.root / INCOMING / f"{damaged.id}.json").exists()
    assert deferred.id not in {r.id for r in spool.unannounced(known, min_age=0)}
    assert sorted(r.id for r in spool.unannounced(known, min_age=0)) == sorted([orphan.id, young.id])


class DeliveredWhileAsked:
    """A set of known ids whose lookup removes a record's metadata, as delivery would meanwhile."""

    def __init__(self, spool: Spool, record: Record) -> None:
        self.spool, self.record = spool, record

    def __contains__(self, record_id: object) -> bool:
        if record_id == self.record.id:
            (self.spool.root / INCOMING / f"{record_id}.json").unlink(missing_ok=True)
        return False


def test_unannounced_skips_a_record_removed_meanwhile(spool: Spool, caplog: pytest.LogCaptureFixture) -> None:
    gone, kept = spool.store_blocking(b"g\r\n", make_record()), spool.store_blocking(b"k\r\n", make_record())
    assert [r.id for r in spool.unannounced(DeliveredWhileAsked(spool, gone), min_age=0)] == [kept.id]
    assert "unreadable" not in caplog.text


def test_unannounced_logs_a_spool_it_cannot_scan(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert Spool(tmp_path / "absent").unannounced(set(), min_age=0) == []
    assert "cannot scan" in caplog.text


def test_concurrent_stores_share_commit_rounds(spool: Spool) -> None:
    async def many() -> list[Record]:
        return await asyncio.gather(*(spool.store(b"m\r\n" * 50, make_record()) for _ in range(200)))

    stored = asyncio.run(many())
    assert len({r.id for r in stored}) == 200
    rounds, changes = spool.stats
    assert changes == 200
    assert rounds < changes, "group commit should batch concurrent writes"
    spool, loaded = reopen(spool)
    try:
        assert len(loaded.records) == 200
    finally:
        spool.close()


def test_store_fails_cleanly_when_the_filesystem_is_full(tmp_path: Path) -> None:
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mountpoint)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and tmpfs to fill a filesystem")
    try:
        store = Spool(mountpoint / "spool")
        store.open()
        kept = store.store_blocking(b"small\r\n", make_record())
        with pytest.raises(SpoolError):
            store.store_blocking(b"x" * 1024 * 1024, make_record())
        assert [p.name for p in (store.root / "msg").iterdir()] == [kept.id]
        assert list((store.root / "tmp").iterdir()) == []
        store.close()
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def test_record_json_is_validated() -> None:
    with pytest.raises(RecordError):
        loads(b"[]")
    with pytest.raises(RecordError):
        loads(json.dumps({"format": 1}).encode())
    record = make_record()
    assert loads(record.dumps()) == record
    assert record.state == INCOMING


def test_recipient_attrs_round_trip_and_records_without_them_still_load(spool: Spool) -> None:
    record = make_record(("a@example.test", "b@example.test"))
    record.recipients[0].attrs = {"notify": ["DELAY", "SUCCESS"], "orcpt": "rfc822;A@Example.test"}
    stored = spool.store_blocking(b"x", record)
    spool, loaded = reopen(spool)
    [again] = loaded.records
    assert [r.attrs for r in again.recipients] == [record.recipients[0].attrs, {}]
    # Only recipients that have attrs carry the key: the JSON of other mail is as before.
    assert "attrs" not in json.loads(stored.dumps())["recipients"][1]
    spool.close()
    # A record written before recipients had attrs (exactly the old format 1 JSON).
    old = (b'{"format":1,"id":"0000000000000ABC","revision":0,"state":"deferred","sender":"s@example.test",'
           b'"recipients":[{"address":"a@example.test","state":"pending","last_reply":"450 4.3.0 later",'
           b'"remote":"mx[192.0.2.1]","updated":1.0}],"created":1.0,"expires":2.0,"next_attempt":1.5,'
           b'"attempts":1,"size":1,"attrs":{}}')
    assert loads(old).recipients[0].attrs == {}
    with pytest.raises(RecordError):
        loads(old.replace(b'"updated":1.0}', b'"updated":1.0,"attrs":[]}'))


def test_one_failing_store_in_a_commit_round_fails_alone(spool: Spool) -> None:
    import dataclasses
    import threading

    taken = spool.store_blocking(b"first\r\n", make_record())
    committer = spool._committer
    assert committer is not None
    # Hold the commit thread so the 31 stores below queue up and form one round.
    release = threading.Event()
    blocker = committer.submit(lambda batch: release.wait(10))
    records = [make_record() for _ in range(30)]
    records.insert(17, dataclasses.replace(make_record(), id=taken.id))  # collides with a stored message
    futures = [committer.submit(spool._store_change(f"m{i}\r\n".encode(), r)) for i, r in enumerate(records)]
    rounds_before = spool.stats[0]
    release.set()
    blocker.result(timeout=10)
    errors = [f.exception(timeout=30) for f in futures]
    failed = [i for i, e in enumerate(errors) if e is not None]
    assert failed == [17] and isinstance(errors[17], SpoolError)
    assert spool.stats[0] > rounds_before
    fresh, loaded = reopen(spool)
    try:
        ids = {r.id for r in loaded.records}
        assert ids == {taken.id} | {r.id for i, r in enumerate(records) if i != 17}
        assert fresh.read_message(taken.id) == b"first\r\n"  # the colliding store kept nothing of its own
        assert fresh.read_message(records[0].id) == b"m0\r\n" and not loaded.corrupt
    finally:
        fresh.close()


def test_directories_get_explicit_modes_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        store = Spool(tmp_path / "spool" / "0")
        store.open()
        store.close()
    finally:
        os.umask(old)
    root = tmp_path / "spool" / "0"
    assert root.stat().st_mode & 0o777 == 0o750 and root.parent.stat().st_mode & 0o777 == 0o750
    for name in ("tmp", "msg", "corrupt", INCOMING, DEFERRED, HOLD):
        assert (root / name).stat().st_mode & 0o777 == 0o700, name


def test_a_fifo_in_the_spool_is_quarantined_without_being_opened(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    store = Spool(root)
    store.open()
    kept = store.store_blocking(b"x\r\n", make_record())
    store.close()
    os.mkfifo(root / INCOMING / f"{new_id()}.json")
    os.mkfifo(root / DEFERRED / "junk")
    # Opening a FIFO blocks until a writer comes: run the load in a child with a deadline.
    code = ("import sys; from spool import Spool; r = Spool(sys.argv[1]).open(); "
            "print(len(r.records), len(r.corrupt))")
    done = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "2"]
    assert "not a regular file" in done.stderr
    assert sorted(p.name.split("-")[0] for p in (root / "corrupt").iterdir()) == [DEFERRED, INCOMING]
    assert (root / INCOMING / f"{kept.id}.json").exists()


def test_attempt_history_is_bounded_and_old_records_load_without_it() -> None:
    from spool.record import HISTORY_ATTEMPTS, HISTORY_RECIPIENTS

    record = Record(new_id(), "a@example.com", [Recipient("b@example.com")], 1.0, 2.0, 1.0, 10)
    old = record.dumps()
    assert b"history" not in old  # a record without attempts is written as before
    again = loads(old)
    assert again.history == [] and again.history_dropped == 0
    many = [{"address": f"r{i}@example.com", "reply": "450 " + "x" * 5000} for i in range(HISTORY_RECIPIENTS + 5)]
    for n in range(HISTORY_ATTEMPTS + 7):
        record.attempts = n + 1
        record.remember(100.0 + n, [dict(r) for r in many])
    back = loads(record.dumps())
    assert len(back.history) == HISTORY_ATTEMPTS and back.history_dropped == 7
    assert back.history[0]["attempt"] == 8 and back.history[-1]["attempt"] == HISTORY_ATTEMPTS + 7
    assert all(len(r["results"]) == HISTORY_RECIPIENTS and r["more"] == 5 for r in back.history)
    assert len(record.dumps()) < 100_000  # bounded whatever the retries and replies
    with pytest.raises(RecordError):
        loads(json.dumps({**json.loads(old), "history": "nope"}).encode())
