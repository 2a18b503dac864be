"""Logging set-up and mail events.

Every step of a message's life is one event line, ``event`` plus fields, the
queue id among them, so one ``grep QUEUEID`` shows a message's whole
history.  Fields ride on the log record (``record.fields``) for structured
formatters.  Never log passwords or message bodies.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

_events = logging.getLogger("mta.event")


def setup(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiosmtpd logs every command line at INFO; that is debug detail here.
    logging.getLogger("mail.log").setLevel(logging.WARNING)


def _value(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\n\r\t'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r") + '"'
    return text


def event(name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one mail event: ``event=NAME queue_id=... key=value ...``."""
    present = {k: v for k, v in fields.items() if v is not None}
    text = " ".join([f"event={name}"] + [f"{k}={_value(v)}" for k, v in present.items()])
    _events.log(level, text, extra={"fields": {"event": name, **present}})
