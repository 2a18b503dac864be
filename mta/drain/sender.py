"""Moving every queued message of a spool to other pods.

Each record goes, with its message, to one of the target addresses (round
robin; on failure the next target is tried); once a target has answered
``accepted`` or ``duplicate`` the message is durably removed here.  A
message no target takes stays in this spool untouched, so a failed drain
loses nothing: the spool (a retained PersistentVolumeClaim) can be drained
again later by ``mta drain``.

Each request is signed for the pod it goes to (``Target.pod``), with a
fresh nonce per attempt; with a TLS context it goes over HTTPS, the
target's certificate verified against its host name.

Bounds: one request per message per target, each with a timeout, all
within one deadline.  Failure: never raises for a refused or unreachable
target; the ``DrainReport`` counts what moved and what stayed, with reasons.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import aiohttp

from mta.drain import wire
from mta.obs.log import event
from spool import Record, Spool, SpoolError
from spool.store import STATES

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 30.0


@dataclass(frozen=True)
class Target:
    address: str  # host:port of its handoff endpoint
    pod: str  # its pod name, which the request is signed for


@dataclass
class DrainReport:
    moved: int = 0
    duplicates: int = 0
    left: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.left


async def _remove_everywhere(spool: Spool, record: Record) -> None:
    # The record's state in memory may lag a write still in the commit
    # queue; removing its metadata under every state leaves nothing behind.
    await asyncio.gather(*(spool.remove(dataclasses.replace(record, state=state)) for state in STATES))


async def _post(session: aiohttp.ClientSession, target: Target, secret: bytes, body: bytes,
                timeout: float, tls: ssl.SSLContext | None, server_name: str | None) -> str:
    headers = wire.sign(secret, body, target.pod)
    scheme = "https" if tls is not None else "http"
    async with session.post(f"{scheme}://{target.address}{wire.PATH}", data=body, headers=headers,
                            ssl=tls if tls is not None else True,
                            server_hostname=server_name if tls is not None else None,
                            timeout=aiohttp.ClientTimeout(total=timeout)) as response:
        if response.status != 200:
            text = (await response.text())[:200]
            raise RuntimeError(f"{target} answered {response.status}: {text}")
        answer = await response.json()
        return str(answer.get("result"))


async def hand_over(spool: Spool, records: Iterable[Record], targets: list[Target], secret: bytes,
                    deadline: float, tls: ssl.SSLContext | None = None,
                    server_name: str | None = None) -> DrainReport:
    """Send every record to ``targets``; ``deadline`` is on the ``time.monotonic`` clock.

    With ``tls``, over HTTPS; ``server_name`` is the name the targets' certificates must carry
    (None: each target's host)."""
    report = DrainReport()
    ordered = sorted(records, key=lambda r: r.created)
    if not targets:
        report.left = [r.id for r in ordered]
        report.errors.append("no pod to hand mail to")
        return report
    turn = 0
    async with aiohttp.ClientSession() as session:
        for record in ordered:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                report.left.append(record.id)
                continue
            try:
                message = await spool.message(record.id)
            except SpoolError as exc:
                report.left.append(record.id)
                report.errors.append(f"{record.id}: {exc}")
                continue
            body = wire.encode(record, message)
            result = None
            for step in range(len(targets)):
                target = targets[(turn + step) % len(targets)]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    result = await _post(session, target, secret, body, min(REQUEST_TIMEOUT, remaining), tls,
                                         server_name)
                except (aiohttp.ClientError, TimeoutError, RuntimeError, ValueError, ssl.SSLError) as exc:
                    report.errors.append(f"{record.id} to {target.address}: {exc}")
                    event("handoff_failed", level=logging.WARNING, queue_id=record.id, target=target.address,
                          reason=str(exc))
                    continue
                event("handed_over", queue_id=record.id, target=target.address, result=result, attempts=record.attempts,
                      pending=len(record.pending()))
                break
            turn += 1
            if result is None:
                report.left.append(record.id)
                continue
            try:
                await _remove_everywhere(spool, record)
            except SpoolError as exc:
                # The target has it; a later drain repeats it and gets "duplicate".
                report.errors.append(f"{record.id}: handed over but not removed here: {exc}")
                report.left.append(record.id)
                continue
            if result == "duplicate":
                report.duplicates += 1
            else:
                report.moved += 1
    return report
