"""What an operator sees of the queue and does to it (``mta queue ...``).

``describe`` is the operator's view of one record; ``Operator`` lists,
shows and traces records (``trace``: the attempt history the record keeps),
reads a message's bytes (``body``, base64 on the socket) and applies flush, hold, release, delete and bounce.  Actions
go through the scheduler's own state, so they never race a delivery: a
message in a delivery round gets delete, hold or bounce when the round
ends, and flush or release is refused while it is being delivered.

Failure: an action whose spool write fails answers ``failed: ...`` for that
id and leaves the message in its last durable state; others go on.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from datetime import UTC, datetime
from typing import Any

from mta.message import split_header
from mta.obs.log import event
from mta.scheduler.queue import Scheduler
from mta.scheduler.verdict import fail_pending
from spool import Record, SpoolError
from spool.store import DEFERRED, HOLD

log = logging.getLogger(__name__)

ACTIONS = ("flush", "hold", "release", "delete", "bounce")
ACT_TOGETHER = 2048  # records whose changes are in flight at once (the commit thread takes 512 a round)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def describe(record: Record) -> dict[str, Any]:
    """The operator's view of a record (``mta queue list --json``)."""
    return {
        "id": record.id,
        "state": record.state,
        "sender": record.sender,
        "recipients": [
            {"address": r.address, "state": r.state, "last_reply": r.last_reply, "remote": r.remote}
            for r in record.recipients
        ],
        "attempts": record.attempts,
        "created": _iso(record.created),
        "next_attempt": _iso(record.next_attempt),
        "expires": _iso(record.expires),
        "size": record.size,
    }


def trace(record: Record) -> dict[str, Any]:
    """``describe`` plus each kept delivery round, times in ISO form (``mta queue trace``)."""
    info = describe(record)
    info["history"] = [{**round_, "at": _iso(round_["at"])} if isinstance(round_.get("at"), (int, float))
                       else round_ for round_ in record.history]
    info["history_dropped"] = record.history_dropped
    return info


class Operator:
    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def list(self) -> list[dict[str, Any]]:
        return [describe(r) for r in sorted(self.scheduler.records.values(), key=lambda r: r.created)]

    def show(self, record_id: str) -> dict[str, Any] | None:
        record = self.scheduler.records.get(record_id)
        if record is None:
            return None
        info = describe(record)
        try:
            header, _ = split_header(self.scheduler.spool.read_message(record_id))
            info["header"] = header.decode("utf-8", errors="replace")
        except SpoolError:
            info["header"] = None
        return info

    def trace(self, record_id: str) -> dict[str, Any] | None:
        record = self.scheduler.records.get(record_id)
        return trace(record) if record is not None else None

    def body(self, record_id: str) -> str | None:
        """The stored message (header and body) in base64, or None for an unknown or unreadable id."""
        if record_id not in self.scheduler.records:
            return None
        try:
            return base64.b64encode(self.scheduler.spool.read_message(record_id)).decode()
        except SpoolError:
            return None

    async def act(self, action: str, ids: list[str]) -> dict[str, str]:
        """Apply an operator action; returns a word of result per id."""
        if action == "flush" and not ids:
            ids = [r.id for r in self.scheduler.records.values() if r.state != HOLD]
        results: dict[str, str] = {}
        # Many records at once, so that the spool's group commit gathers
        # their changes into a few commit rounds instead of one round each.
        # Each _act_one claims its record before its first await, so running
        # them side by side races neither a delivery nor one another.
        for start in range(0, len(ids), ACT_TOGETHER):
            chunk = ids[start:start + ACT_TOGETHER]
            words = await asyncio.gather(*(self._act_one(action, i) for i in dict.fromkeys(chunk)))
            results.update(zip(dict.fromkeys(chunk), words, strict=True))
            self.scheduler.wake()
        return results

    async def _act_one(self, action: str, record_id: str) -> str:
        scheduler = self.scheduler
        record = scheduler.records.get(record_id)
        if record is None:
            return "unknown id"
        if action not in ACTIONS:
            return f"unknown action {action!r}"
        if record_id in scheduler.active:
            if action in ("delete", "hold", "bounce"):
                scheduler.after_round[record_id] = action
                return "will be done when the current delivery attempt ends"
            return "being delivered now"
        scheduler.active.add(record_id)
        try:
            now = scheduler.clock()
            if action == "flush":
                if record.state == HOLD:
                    return "on hold; release it first"
                record.next_attempt = now
                scheduler.track(await scheduler.spool.save(record))
            elif action == "release":
                if record.state != HOLD:
                    return "not on hold"
                record.next_attempt = now
                scheduler.track(await scheduler.spool.save(record, DEFERRED))
            elif action == "hold":
                if record.state == HOLD:
                    return "already on hold"
                scheduler.records[record_id] = await scheduler.spool.save(record, HOLD)
                event("held", queue_id=record_id)
            elif action == "delete":
                await scheduler.forget(record, "deleted by the administrator")
            else:  # bounce
                failed = fail_pending(record, now, scheduler.classifier, expired=False)
                await scheduler.conclude(record, failed, None, now)
            return "ok"
        except SpoolError as exc:
            log.error("queue_id=%s %s failed: %s", record_id, action, exc)
            return f"failed: {exc}"
        finally:
            scheduler.active.discard(record_id)
