"""The metadata record kept beside each spooled message, and its JSON form.

The JSON is versioned (``format``) so that a newer reader can still load
older spools; anything that does not validate raises ``RecordError`` and the
store quarantines the file.  Never pickle: an operator must be able to read
a spool with ``cat``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

FORMAT = 1

# Recipient states.  ``pending`` still needs an attempt; the others are final.
PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"
RECIPIENT_STATES = (PENDING, DELIVERED, FAILED)

ID_PATTERN = re.compile(r"^[0-9A-Z]{8,40}$")

# The attempt history (``mta queue trace``) keeps the last HISTORY_ATTEMPTS
# rounds, each naming at most HISTORY_RECIPIENTS recipients, so that a record
# stays a few KiB whatever the retries; older rounds are only counted.
HISTORY_ATTEMPTS = 20
HISTORY_RECIPIENTS = 10
HISTORY_REPLY_CHARS = 300


class RecordError(ValueError):
    """A metadata file does not hold a valid record."""


@dataclass
class Recipient:
    address: str
    state: str = PENDING
    last_reply: str | None = None
    remote: str | None = None
    updated: float | None = None
    # Free-form facts of the layer above about this recipient (what the
    # client asked of notifications...), like ``Record.attrs``.  Left out of
    # the JSON when empty; records written before it existed load with {}.
    attrs: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = {
            "address": self.address,
            "state": self.state,
            "last_reply": self.last_reply,
            "remote": self.remote,
            "updated": self.updated,
        }
        if self.attrs:
            out["attrs"] = self.attrs
        return out


@dataclass
class Record:
    """Everything the queue knows of one message except its bytes."""

    id: str
    sender: str
    recipients: list[Recipient]
    created: float
    expires: float
    next_attempt: float
    size: int
    attempts: int = 0
    state: str = "incoming"
    revision: int = 0
    # Free-form facts of the layer above (client address, listener, DSN
    # flag...): the spool stores them and never interprets them.
    attrs: dict[str, Any] = field(default_factory=dict)
    # The last delivery rounds, oldest first: {"at", "attempt", "results":
    # [{"address", "mx_host", "mx_ip", "tls", "reply"}], "more"?}; rounds
    # dropped off the front are counted in ``history_dropped``.  Records
    # written before it existed load with none.
    history: list[dict[str, Any]] = field(default_factory=list)
    history_dropped: int = 0

    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.state == PENDING]

    def remember(self, at: float, results: list[dict[str, Any]]) -> None:
        """Add one delivery round to the bounded history."""
        entry: dict[str, Any] = {"at": at, "attempt": self.attempts, "results": results[:HISTORY_RECIPIENTS]}
        for result in entry["results"]:
            if isinstance(result.get("reply"), str):
                result["reply"] = result["reply"][:HISTORY_REPLY_CHARS]
        if len(results) > HISTORY_RECIPIENTS:
            entry["more"] = len(results) - HISTORY_RECIPIENTS
        self.history.append(entry)
        if len(self.history) > HISTORY_ATTEMPTS:
            self.history_dropped += len(self.history) - HISTORY_ATTEMPTS
            del self.history[:-HISTORY_ATTEMPTS]

    def to_json(self) -> dict[str, Any]:
        out = self._core_json()
        if self.history:
            out["history"] = self.history
        if self.history_dropped:
            out["history_dropped"] = self.history_dropped
        return out

    def _core_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "id": self.id,
            "revision": self.revision,
            "state": self.state,
            "sender": self.sender,
            "recipients": [r.to_json() for r in self.recipients],
            "created": self.created,
            "expires": self.expires,
            "next_attempt": self.next_attempt,
            "attempts": self.attempts,
            "size": self.size,
            "attrs": self.attrs,
        }

    def dumps(self) -> bytes:
        return json.dumps(self.to_json(), separators=(",", ":"), ensure_ascii=False).encode()


def _require(obj: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in obj:
        raise RecordError(f"missing field {key!r}")
    value = obj[key]
    # bool is an int in Python; never accept it where a number is meant.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise RecordError(f"field {key!r} has the wrong type")
    if not isinstance(value, kind):
        raise RecordError(f"field {key!r} has the wrong type")
    return value


def loads(data: bytes) -> Record:
    """Parse and validate one metadata file's bytes."""
    if not data:
        raise RecordError("empty metadata file")
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RecordError(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise RecordError("not a JSON object")
    fmt = _require(obj, "format", int)
    if fmt != FORMAT:
        raise RecordError(f"unsupported format {fmt}")
    number = (int, float)
    recipients = []
    for raw in _require(obj, "recipients", list):
        if not isinstance(raw, dict):
            raise RecordError("recipient is not an object")
        _require(raw, "address", str)
        state = _require(raw, "state", str)
        if state not in RECIPIENT_STATES:
            raise RecordError(f"unknown recipient state {state!r}")
        attrs = raw.get("attrs", {})
        if not isinstance(attrs, dict):
            raise RecordError("recipient attrs is not an object")
        recipients.append(
            Recipient(
                address=raw["address"],
                state=state,
                last_reply=raw.get("last_reply"),
                remote=raw.get("remote"),
                updated=raw.get("updated"),
                attrs=attrs,
            )
        )
    if not recipients:
        raise RecordError("no recipients")
    history = obj.get("history", [])
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise RecordError("history is not a list of objects")
    dropped = obj.get("history_dropped", 0)
    if not isinstance(dropped, int) or isinstance(dropped, bool):
        raise RecordError("field 'history_dropped' has the wrong type")
    record_id = _require(obj, "id", str)
    if not ID_PATTERN.match(record_id):
        raise RecordError(f"bad id {record_id!r}")
    return Record(
        id=record_id,
        sender=_require(obj, "sender", str),
        recipients=recipients,
        created=float(_require(obj, "created", number)),
        expires=float(_require(obj, "expires", number)),
        next_attempt=float(_require(obj, "next_attempt", number)),
        size=_require(obj, "size", int),
        attempts=_require(obj, "attempts", int),
        state=_require(obj, "state", str),
        revision=_require(obj, "revision", int),
        attrs=_require(obj, "attrs", dict),
        history=history,
        history_dropped=dropped,
    )
