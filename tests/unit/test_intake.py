"""The intake while the spool's earlier mail is still loading: ids from before the cut-off wait."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from mta.intake import Envelope, Intake
from spool import Recipient, Record, Spool
from spool.ids import new_id


def test_a_put_of_an_earlier_id_waits_for_the_load_and_new_mail_does_not(tmp_path: Path) -> None:
    earlier = new_id(time.time() - 60)  # a handoff's, or a retried idempotent request's
    spool = Spool(tmp_path / "spool")
    cutoff = spool.take()
    announced: list[str] = []
    intake = Intake(spool, lambda record: announced.append(record.id), 3600)

    async def run() -> None:
        loaded = asyncio.Event()
        intake.wait_for_load(cutoff, loaded)
        fresh = await asyncio.wait_for(intake.put(Envelope("a@example.test", ["b@example.test"]), b"new"), 10)
        waiting = asyncio.create_task(intake.put(Envelope("a@example.test", ["b@example.test"]), b"old",
                                                 queue_id=earlier))
        now = time.time()
        handed = asyncio.create_task(intake.put_record(Record(
            id=new_id(now - 120), sender="a@example.test", recipients=[Recipient("c@example.test")],
            created=now - 120, expires=now + 3600, next_attempt=now, size=3), b"old"))
        await asyncio.sleep(0.3)
        assert announced == [fresh.id] and not waiting.done() and not handed.done()
        loaded.set()
        await asyncio.wait_for(asyncio.gather(waiting, handed), 10)
        assert len(announced) == 3 and sorted(announced[1:]) == sorted([waiting.result().id, handed.result().id])

    try:
        asyncio.run(run())
    finally:
        spool.close()
