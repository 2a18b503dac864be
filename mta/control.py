"""Operator control of a running server through a Unix socket in the spool.

``mta queue ...`` must never race the server for the spool's files, so
while a server owns the spool the CLI asks it to act: one JSON request line
(``{"action": "hold", "ids": [...]}``) gets one JSON reply line.  The socket
lives in its own directory in the spool, ``control/``, created with mode
0700 whatever the umask: the socket file exists (with the umask's mode)
before ``chmod`` can reach it, so the directory is what keeps other local
users out.  An action that runs longer than ``ANSWER_WITHIN`` (a flush of
a large queue) is answered at once as going on and finishes in the server.
Failure: the client raises ``ControlError`` with a readable reason, a
timeout included; ``start`` raises ``OSError`` when the directory or socket cannot be made.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the CLI's side of the socket needs none of the scheduler
    from mta.auth.gate import AuthGate
    from mta.scheduler.operator import Operator
    from mta.tlsrpt.send import Reporter

log = logging.getLogger(__name__)

ACTIONS = ("list", "show", "trace", "body", "flush", "delete", "hold", "release", "bounce", "unlock", "tls-report")
MAX_REQUEST = 1024 * 1024
# An action still running after this long is answered "goes on" and left
# to finish in the server, well within the client's own timeout.
ANSWER_WITHIN = 10.0
DEFAULT_TIMEOUT = 30.0
_background: set[asyncio.Future[dict[str, str]]] = set()  # keeps running actions referenced


class ControlError(Exception):
    pass


SOCKET_DIR_MODE = 0o700


def socket_path(spool_root: Path) -> Path:
    return Path(spool_root) / "control" / "control.sock"


async def handle(operator: Operator, request: dict[str, Any],
                 answer_within: float | None = ANSWER_WITHIN, gate: AuthGate | None = None,
                 reporter: Reporter | None = None) -> dict[str, Any]:
    """One request; an action still running after ``answer_within`` seconds goes on in the background."""
    action = request.get("action")
    ids = request.get("ids") or []
    if action not in ACTIONS or not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        return {"ok": False, "error": f"bad request; actions are {', '.join(ACTIONS)}"}
    if action == "list":
        return {"ok": True, "result": operator.list()}
    if action in ("show", "trace", "body"):
        look = {"show": operator.show, "trace": operator.trace, "body": operator.body}[action]
        return {"ok": True, "result": {i: look(i) for i in ids}}
    if action == "tls-report":
        day = request.get("date")
        if reporter is None:
            return {"ok": False, "error": "tls_reports.enabled is off on this server"}
        if not isinstance(day, str):
            return {"ok": False, "error": "tls-report needs a date (YYYY-MM-DD)"}
        return {"ok": True, "result": await reporter.send_day(day)}
    if action == "unlock":
        ip = request.get("ip")
        if gate is None:
            return {"ok": False, "error": "this server has no AUTH listener: nothing to unlock"}
        if len(ids) != 1 or not (ip is None or isinstance(ip, str)):
            return {"ok": False, "error": "unlock takes one user name and at most one address"}
        return {"ok": True, "result": await gate.unlock(ids[0], ip)}
    work = asyncio.ensure_future(operator.act(action, ids))
    done, _ = await asyncio.wait({work}, timeout=answer_within)
    if work in done:
        return {"ok": True, "result": work.result()}
    # A flush of a large queue: it goes on here, the operator hears so now.
    _background.add(work)
    work.add_done_callback(_finished_in_background)
    count = len(ids) if ids else "every queued"
    return {"ok": True, "result": {}, "running": f"{action} of {count} message(s) goes on in the server; "
                                                  f"'mta queue list' shows where it stands"}


def _finished_in_background(work: asyncio.Future[dict[str, str]]) -> None:
    _background.discard(work)
    if work.cancelled():
        return
    if work.exception() is not None:
        log.error("queue action failed in the background: %s", work.exception())
        return
    failed = sum(1 for word in work.result().values() if word != "ok")
    log.info("queue action done in the background: %d message(s), %d not ok", len(work.result()), failed)


class ControlServer:
    def __init__(self, path: Path, operator: Operator, gate: AuthGate | None = None,
                 reporter: Reporter | None = None) -> None:
        self.path = path
        self.reporter = reporter  # ``mta tls report --send``
        self.operator = operator
        self.gate = gate  # the process's AUTH gate, for ``mta user unlock``
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(mode=SOCKET_DIR_MODE, parents=True, exist_ok=True)
        os.chmod(self.path.parent, SOCKET_DIR_MODE)  # mkdir's mode is filtered by the umask
        # A socket file left by a killed server; we own the spool lock, so it is stale.
        if self.path.exists() or self.path.is_symlink():
            self.path.unlink()
        self.server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=MAX_REQUEST)
        os.chmod(self.path, 0o600)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=10)
            try:
                request = json.loads(line)
                response = await handle(self.operator, request, gate=self.gate,
                                        reporter=self.reporter) if isinstance(request, dict) else \
                    {"ok": False, "error": "request must be a JSON object"}
            except ValueError:
                response = {"ok": False, "error": "request is not JSON"}
            writer.write(json.dumps(response).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.LimitOverrunError, ValueError) as exc:
            log.warning("control request failed: %s", exc)
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        if self.path.exists():
            self.path.unlink()


class StillRunning(Exception):
    """The server took the action and goes on with it after answering."""


def request(path: Path, action: str, ids: list[str], timeout: float = DEFAULT_TIMEOUT,
            extra: dict[str, Any] | None = None) -> Any:
    """Send one request to the running server; returns its ``result``.

    Raises ``ControlError`` (never a bare socket error) when the server
    cannot be reached or does not answer within ``timeout`` seconds, and
    ``StillRunning`` when it answered that the action goes on in the background.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError as exc:
            raise ControlError(f"the server owns the spool but its control socket {path} "
                               f"does not answer: {exc.strerror}") from None
        chunks = []
        try:
            sock.sendall(json.dumps({**(extra or {}), "action": action, "ids": ids}).encode() + b"\n")
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except TimeoutError:
            raise ControlError(f"the server did not answer within {timeout:g}s; the {action} may still "
                               f"be running there ('mta queue list' shows the queue)") from None
        except OSError as exc:
            raise ControlError(f"the control socket {path} failed: {exc.strerror or exc}") from None
    try:
        response = json.loads(b"".join(chunks))
    except ValueError:
        raise ControlError("the server's reply was not understood") from None
    if not response.get("ok"):
        raise ControlError(response.get("error", "the server refused the request"))
    if response.get("running"):
        raise StillRunning(response["running"])
    return response["result"]
