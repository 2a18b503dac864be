"""Logging set-up and mail events.

Every step of a message's life is one event line, ``event`` plus fields, the
queue id among them, so one ``grep QUEUEID`` shows a message's whole
history.  The default output is one JSON object per line on stdout
(``ts``, ``level``, ``logger``, ``event``, ``queue_id``, then the event's
fields, then ``message``: the same event as one ``event=NAME key=value``
line; plain log lines carry only ``message``); ``text`` gives just that
``event=NAME key=value`` form, for a terminal.  Values come from remote
peers and clients, so the text form shows control characters as escapes
(``\\x1b``), never raw: a reply cannot drive the terminal reading the log.

Events are also handed to subscribers (metrics, webhooks), whatever the log
level, so this is the one place every mail event passes through.  A
subscriber that raises is logged and otherwise ignored: it never breaks the
caller.  Fields named like secrets, or like message content, are replaced
with ``[redacted]``; callers must still never pass passwords or bodies.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal, TextIO

from mta.terminal import escape, escape_block

_events = logging.getLogger("mta.event")
_log = logging.getLogger(__name__)

Subscriber = Callable[[str, dict[str, Any]], None]
_subscribers: list[Subscriber] = []

# Belt and braces: these never reach a log line or a subscriber.
_REDACTED = frozenset({"password", "passwd", "secret", "token", "authorization", "body", "content"})

Format = Literal["json", "text"]

# The message a task is working on (set by the courier around a delivery), so a
# plain log line from deep in delivery — a mail exchanger that did not answer —
# carries the queue id too, and ``grep ID`` finds it.
current_queue_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("queue_id", default=None)


@contextmanager
def about(queue_id: str) -> Iterator[None]:
    """Log lines of this task inside the block carry ``queue_id``."""
    token = current_queue_id.set(queue_id)
    try:
        yield
    finally:
        current_queue_id.reset(token)


class QueueIdFilter(logging.Filter):
    """Stamps each record with the current task's queue id; runs in the caller's context."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "queue_id"):
            record.queue_id = current_queue_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,  # which process of the server (mta.workers)
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                if key not in ("ts", "level", "logger", "pid", "message"):
                    out[key] = _jsonable(value)
            # The same event as one readable line, for people reading raw output.
            out["message"] = record.getMessage()
        else:
            queue_id = getattr(record, "queue_id", None)
            if queue_id:
                out["queue_id"] = queue_id
            out["message"] = record.getMessage()
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"), default=str)


class TextFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER: MESSAGE`` with every control character escaped."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if not isinstance(getattr(record, "fields", None), dict):
            # An event's text is built by _value, which already escapes; any
            # other message may interpolate a peer's words.
            message = escape(message)
            queue_id = getattr(record, "queue_id", None)
            if queue_id and f"queue_id={queue_id}" not in message:
                message = f"queue_id={queue_id} {message}"
        line = f"{self.formatTime(record)} {record.levelname} {record.name}: {message}"
        if record.exc_info:
            line += "\n" + escape_block(self.formatException(record.exc_info))
        return line


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def setup(level: str = "info", fmt: Format = "json", stream: TextIO | None = None) -> None:
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.addFilter(QueueIdFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiosmtpd logs every command line at INFO; that is debug detail here.
    logging.getLogger("mail.log").setLevel(logging.WARNING)


def subscribe(subscriber: Subscriber) -> None:
    """Call ``subscriber(name, fields)`` for every event; ``fields`` is read-only."""
    _subscribers.append(subscriber)


def unsubscribe(subscriber: Subscriber) -> None:
    if subscriber in _subscribers:
        _subscribers.remove(subscriber)


_NEEDS_QUOTES = re.compile(r'[ "=\\\x00-\x1f\x7f-\x9f]')
_QUOTED = re.compile(r'["\\\x00-\x1f\x7f-\x9f]')
_SHORT = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _quoted_char(match: re.Match[str]) -> str:
    char = match.group()
    return _SHORT.get(char) or f"\\x{ord(char):02x}"


def _value(value: Any) -> str:
    text = str(value)
    if not text or _NEEDS_QUOTES.search(text):
        return '"' + _QUOTED.sub(_quoted_char, text) + '"'
    return text


def publish(name: str, fields: dict[str, Any]) -> None:
    """Hand an event to the subscribers only: one another process already logged (``mta.workers``)."""
    for subscriber in tuple(_subscribers):
        try:
            subscriber(name, fields)
        except Exception:  # noqa: BLE001 - observers must never break mail flow
            _log.exception("event subscriber %r failed on %s", subscriber, name)


def event(name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one mail event: ``event=NAME queue_id=... key=value ...``."""
    present = {k: ("[redacted]" if k.lower() in _REDACTED else v) for k, v in fields.items() if v is not None}
    publish(name, present)
    if _events.isEnabledFor(level):
        text = " ".join([f"event={name}"] + [f"{k}={_value(v)}" for k, v in present.items()])
        ordered = {"event": name, **present}
        _events.log(level, text, extra={"fields": ordered})
