"""The line protocol between ``mta serve`` and its worker processes.

One JSON object per line over a socket pair.  The main process writes the
configuration (one line) and nothing else; a worker writes:

- ``ready``: ``listeners`` it serves, once they listen;
- ``record``: a record it has stored (the spool's JSON form), to schedule;
- ``event``: a mail event (``name``, ``fields``) for the logs, metrics and webhooks;
- ``timing``: how long a spool ``operation`` took until durable (``seconds``);
- ``report``: its open ``sessions`` and implicit-TLS ``handshakes`` by listener and spool ``commits`` (rounds, changes).

Failure: ``decode`` raises ``ChannelError`` for a line that is not one of
these; the reader logs it and goes on.  A line longer than ``LIMIT``
ends the channel (the reader's ``ValueError``).
"""

from __future__ import annotations

import json
from typing import Any

LIMIT = 1 << 24  # longest line on the channel (the config, a record)
KINDS = ("ready", "record", "event", "timing", "report")


class ChannelError(ValueError):
    pass


def encode(kind: str, **fields: Any) -> bytes:
    return json.dumps({"kind": kind, **fields}, default=str, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    try:
        message = json.loads(line)
    except ValueError as exc:
        raise ChannelError(f"not JSON: {exc}") from None
    if not isinstance(message, dict) or message.get("kind") not in KINDS:
        raise ChannelError("not a channel message")
    return message
