"""Operator actions on a large queue: few commit rounds, an answer in bounded time, no traceback.

A real spool on disk holds a few thousand deferred messages; ``flush``
goes through the real ``Operator`` and the spool's group commit, and the
test counts the commit rounds it took.  The CLI is run as a process
against a control socket that accepts and never answers, as a server
stuck in a long action would look from outside.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

from mta import control
from mta.config import Config
from mta.intake import Envelope, Intake
from mta.scheduler.operator import Operator
from mta.scheduler.queue import Scheduler
from spool import Spool
from spool.store import DEFERRED

RECORDS = 2000


def test_flush_of_thousands_commits_in_few_rounds(tmp_path: Path) -> None:
    config = Config.model_validate({"hostname": "mta.example.com", "spool": {"path": str(tmp_path)}})

    async def main() -> None:
        spool = Spool(config.spool_shard, config.spool.sync)
        spool.open()
        try:
            intake = Intake(spool, lambda record: None, 3600)
            stored = await asyncio.gather(*(intake.put(Envelope("app@example.com", [f"u{n}@example.net"]),
                                                       b"Subject: t\r\n\r\nbody\r\n") for n in range(RECORDS)))
            deferred = await asyncio.gather(*(spool.save(record, DEFERRED) for record in stored))
            scheduler = Scheduler(spool, config, courier=None)  # its loop does not run: nothing is delivered
            scheduler.load(deferred)
            rounds_before, changes_before = spool.stats
            answer = await asyncio.wait_for(Operator(scheduler).act("flush", []), 120)
            rounds, changes = spool.stats[0] - rounds_before, spool.stats[1] - changes_before
            assert len(answer) == RECORDS and set(answer.values()) == {"ok"}
            assert changes == RECORDS
            # One commit round per record before; the group commit takes up to 512 a round.
            assert rounds <= RECORDS // 100, rounds
            assert all(r.revision == 3 and r.state == DEFERRED for r in scheduler.records.values())
        finally:
            spool.close()

    asyncio.run(main())


class _SlowOperator:
    def __init__(self) -> None:
        self.finished = asyncio.Event()

    async def act(self, action: str, ids: list[str]) -> dict[str, str]:
        await asyncio.sleep(0.5)
        self.finished.set()
        return dict.fromkeys(ids, "ok")


def test_a_long_action_is_answered_at_once_and_finishes_in_the_server() -> None:
    async def main() -> None:
        operator = _SlowOperator()
        response = await control.handle(operator, {"action": "flush", "ids": []}, answer_within=0.05)  # type: ignore[arg-type]
        assert response["ok"] and "goes on in the server" in response["running"]
        assert not operator.finished.is_set()
        await asyncio.wait_for(operator.finished.wait(), 10)
        # Without a bound (the CLI on a stopped server's spool) it waits for the result.
        response = await control.handle(operator, {"action": "hold", "ids": ["A"]}, answer_within=None)  # type: ignore[arg-type]
        assert response == {"ok": True, "result": {"A": "ok"}}

    asyncio.run(main())


def test_cli_against_a_server_that_does_not_answer_says_so_without_a_traceback(tmp_path: Path) -> None:
    config_file = tmp_path / "mta.yaml"
    config_file.write_text(f"hostname: mta.example.com\nspool:\n  path: {tmp_path / 'spool'}\n")
    config = Config.model_validate({"hostname": "mta.example.com", "spool": {"path": str(tmp_path / "spool")}})
    spool = Spool(config.spool_shard, config.spool.sync)
    spool.open()  # the "server": it owns the spool, so the CLI must ask through the socket
    path = control.socket_path(config.spool.path)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        silent.bind(str(path))
        silent.listen(4)  # accepted by the kernel, never read, never answered
        done = subprocess.run([sys.executable, "-m", "mta.cli", "-c", str(config_file), "queue", "flush",
                               "--timeout", "1"], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    finally:
        silent.close()
        spool.close()
    assert done.returncode == 1, done
    assert "Traceback" not in done.stderr, done.stderr
    assert "did not answer within 1s" in done.stderr and "may still be running" in done.stderr
