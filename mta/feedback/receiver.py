"""The feedback listener's intake: a report is kept, matched to its message, and acted on.

A listener with ``mode: feedback`` takes mail only for ``feedback.domain``
(``mta.smtp.session``) and hands each message here instead of to the queue
(``put`` has the queue intake's shape).  In order:

1. SPF and DKIM of the report (``mta.feedback.verify``), in a thread;
2. the report is written, with that ``Authentication-Results`` on top, to
   ``<spool>/feedback/<id>.eml`` (``spool.safeio``: fsynced before ``250``);
3. it is read (``mta.feedback.reports``) and matched to our mail by a
   return path with a valid tag (``mta.feedback.verp``): the envelope
   recipient, else one the report names (``Original-Mail-From``, the
   included ``Return-Path``);
4. a bounce's failed recipients are classified (``mta.bounce.classify``)
   and emitted as ``bounced`` (``source: report``), delays as
   ``deferred``; a complaint is ``complained``;
5. only a trusted report (SPF or DKIM passed) suppresses: a failed
   recipient whose category is about the address, a complained one always
   (reason ``complaint``); in ``suppression.scope`` ``sending_domain`` the
   scope is the included message's From domain.

Failure: a report that cannot be written is refused (``451 4.3.0``
through ``mta.replies.for_exception``, the sender retries); one that matches
none of our mail is kept and logged (``feedback_unmatched``) but acts on
nothing; a suppression error is logged and the rest goes on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

import dns.resolver

from mta.config import Config
from mta.delivery.mx import make_sync_resolver
from mta.feedback import reports, verify
from mta.feedback.actions import FeedbackActions
from mta.feedback.verp import ReturnPaths, Tagged
from mta.intake import Envelope
from mta.obs.log import event
from spool import Recipient, Record
from spool.ids import new_id
from spool.safeio import write_file

log = logging.getLogger(__name__)


class FeedbackReceiver:
    def __init__(self, paths: ReturnPaths, directory: Path, actions: FeedbackActions,
                 resolver: Callable[[], dns.resolver.Resolver], authserv_id: str,
                 clock: Callable[[], float] = time.time) -> None:
        self.paths, self.directory, self.actions = paths, directory, actions
        self.resolver, self.authserv_id, self.clock = resolver, authserv_id, clock

    async def put(self, envelope: Envelope, data: bytes, *, queue_id: str | None = None) -> Record:
        queue_id = queue_id or new_id(self.clock())
        client = str(envelope.attrs.get("client") or "")
        helo = str(envelope.attrs.get("helo") or "")
        verdict = await asyncio.to_thread(verify.check, data, client, envelope.sender, helo, self.resolver(),
                                          self.authserv_id)
        kept = self.directory / f"{queue_id}.eml"
        await asyncio.to_thread(self._keep, kept, verdict.header + data)
        report = reports.read(data)
        tagged = self._match(list(envelope.recipients) + report.return_paths)
        fields = {"report_id": queue_id, "client": client, "reporter": report.reporter, **verdict.fields()}
        if tagged is None:
            event("feedback_unmatched", level=logging.WARNING, kind=report.kind, **fields)
        elif report.kind == "bounce":
            await self._bounce(report, tagged, fields)
        elif report.kind == "complaint":
            await self._complaint(report, tagged, fields)
        else:
            event("feedback_ignored", kind=report.kind, queue_id=tagged.queue_id, **fields)
        now = self.clock()
        return Record(id=queue_id, sender=envelope.sender, recipients=[Recipient(r) for r in envelope.recipients],
                      created=now, expires=now, next_attempt=now, size=len(data), attrs=dict(envelope.attrs))

    def _keep(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(mode=0o700, exist_ok=True)
        write_file(path, data, 0o600)

    def _match(self, addresses: list[str]) -> Tagged | None:
        for address in addresses:
            tagged = self.paths.parse(address)
            if tagged is not None:
                return tagged
        return None

    async def _bounce(self, report: reports.Report, tagged: Tagged, fields: dict[str, object]) -> None:
        notices = report.notices
        if tagged.recipient is not None:
            # A return path given to one recipient is about that one, whatever the report's text says.
            notices = [n for n in notices if n.recipient.lower() == tagged.recipient.lower()] or [
                reports.Notice(tagged.recipient, n.action, n.status, n.diagnostic) for n in notices[:1]]
        for notice in notices:
            await self.actions.bounced(notice.recipient, notice.reply, delayed=notice.action == "delayed",
                                       trusted=bool(fields["trusted"]), source="report", queue_id=tagged.queue_id,
                                       sending_domain=report.sending_domain, **_without_trust(fields))

    async def _complaint(self, report: reports.Report, tagged: Tagged, fields: dict[str, object]) -> None:
        await self.actions.complained(tagged.recipient or report.complained,
                                      feedback_type=report.feedback_type or "abuse", trusted=bool(fields["trusted"]),
                                      source="report", queue_id=tagged.queue_id,
                                      sending_domain=report.sending_domain, **_without_trust(fields))


def _without_trust(fields: dict[str, object]) -> dict[str, object]:
    return {key: value for key, value in fields.items() if key != "trusted"}


def build(config: Config, actions: FeedbackActions) -> tuple[ReturnPaths | None, FeedbackReceiver | None]:
    """The return paths and the receiver ``feedback`` asks for; (None, None) without ``feedback.domain``.

    ``OSError`` when the secret file cannot be read (the caller names the key)."""
    settings = config.feedback
    if settings.domain is None or settings.secret_file is None:
        return None, None
    key = settings.secret_file.read_bytes().strip()
    paths = ReturnPaths(settings.domain, key)
    receiver = FeedbackReceiver(paths, config.spool.path / "feedback", actions,
                                lambda: make_sync_resolver(config.dns.servers, config.dns.timeout),
                                config.authserv_id or config.hostname)
    return paths, receiver
