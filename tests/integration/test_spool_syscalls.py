"""The spool's commit order, seen in the system calls (strace), for both sync modes.

A kill -9 only shows that a process crash loses nothing; what survives a
power cut depends on the order of flushes, renames and directory fsyncs.
Each stored message must be flushed (``syncfs``, or ``fsync`` of its files
and of the ``msg`` directory) before its metadata is renamed into
``incoming/``, and that directory must be fsynced before the caller hears
that the message is stored.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

CHILD = """
import asyncio, os, sys, time
from spool import Recipient, Record, Spool
from spool.ids import new_id

async def main(root, mode):
    spool = Spool(root, mode)
    spool.open()

    async def one(i):
        now = time.time()
        record = Record(id=new_id(now), sender="a@b.test", recipients=[Recipient("c@d.test")], created=now,
                        expires=now + 60, next_attempt=now, size=0)
        stored = await spool.store(b"Subject: %d\\r\\n\\r\\nbody\\r\\n" % i, record)
        os.write(1, f"stored {stored.id}\\n".encode())

    await asyncio.gather(*(one(i) for i in range(8)))
    spool.close()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""

CALL = re.compile(r"^\d+\s+(\w+)\((.*)\)\s+=\s+(-?\d+)")


def completed_calls(trace: str) -> list[tuple[str, str, int]]:
    """(name, arguments, result) in the order the calls completed, across threads."""
    pending: dict[str, str] = {}
    calls = []
    for line in trace.splitlines():
        pid = line.split(maxsplit=1)[0]
        if line.endswith("<unfinished ...>"):
            pending[pid] = line.removesuffix(" <unfinished ...>")
            continue
        resumed = re.match(r"^(\d+)\s+<\.\.\. \w+ resumed>(.*)$", line)
        if resumed:
            line = pending.pop(pid, "") + resumed.group(2)
        match = CALL.match(line)
        if match:
            calls.append((match.group(1), match.group(2), int(match.group(3))))
    return calls


def first(calls: list[tuple[str, str, int]], start: int, name: str, text: str) -> int:
    for index in range(start, len(calls)):
        if calls[index][0] == name and text in calls[index][1]:
            return index
    raise AssertionError(f"no {name}({text}...) after call {start}")


@pytest.mark.parametrize("mode", ["syncfs", "fsync"])
def test_flush_then_rename_then_directory_fsync_then_stored(tmp_path: Path, mode: str) -> None:
    root = tmp_path / "spool"
    trace_file = tmp_path / "trace"
    done = subprocess.run(
        ["strace", "-f", "-qq", "-s", "300", "-o", str(trace_file),
         "-e", "trace=openat,syncfs,fsync,rename,renameat,renameat2,write",
         sys.executable, "-c", CHILD, str(root), mode],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    ids = re.findall(r"stored (\w+)", done.stdout)
    assert len(ids) == 8
    calls = completed_calls(trace_file.read_text())
    for record_id in ids:
        created = first(calls, 0, "openat", f"{root}/msg/{record_id}\"")
        metadata = first(calls, created, "openat", f"{root}/tmp/{record_id}.1.json")
        renamed = first(calls, metadata, "rename", f"{root}/incoming/{record_id}.json")
        flushes = calls[metadata:renamed]
        if mode == "syncfs":
            assert any(name == "syncfs" and result == 0 for name, _, result in flushes), record_id
        else:
            fsynced = {args for name, args, result in flushes if name == "fsync" and result == 0}
            assert str(calls[created][2]) in fsynced and str(calls[metadata][2]) in fsynced, record_id
            msg_dir = first(calls, metadata, "openat", f"{root}/msg\"")
            assert msg_dir < renamed and first(calls, msg_dir, "fsync", str(calls[msg_dir][2])) < renamed
        directory = first(calls, renamed, "openat", f"{root}/incoming\"")
        synced = first(calls, directory, "fsync", str(calls[directory][2]))
        told = first(calls, renamed, "write", f"stored {record_id}")
        assert synced < told, f"{record_id}: acknowledged before its directory was fsynced"
