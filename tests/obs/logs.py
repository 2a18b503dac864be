"""Reading the server's JSON log in tests: one object per line, events by name.

Owns nothing but parsing: lines that are not JSON objects (the harness's
``---- start N ----`` markers, a traceback printed by Python itself) are
skipped, so a test sees only what the server logged.
How it fails: ``wait_for_event`` raises TimeoutError with the log attached.
"""

from __future__ import annotations

import json
import time
from typing import Any


def records(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict):
            out.append(item)
    return out


def events(server: Any, name: str | None = None, **match: Any) -> list[dict[str, Any]]:
    """The server's events, optionally only ``name`` and those whose fields equal ``match``."""
    found = []
    for item in records(server.log()):
        if "event" not in item or (name is not None and item["event"] != name):
            continue
        if all(item.get(key) == value for key, value in match.items()):
            found.append(item)
    return found


def wait_for_event(server: Any, name: str, timeout: float = 20.0, count: int = 1, **match: Any
                   ) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = events(server, name, **match)
        if len(found) >= count:
            return found
        time.sleep(0.1)
    raise TimeoutError(f"{count} event(s) {name!r} {match} not in the log after {timeout}s:\n{server.log()}")
