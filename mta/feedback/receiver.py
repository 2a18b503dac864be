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

from mta.bounce.classify import ADDRESS_CATEGORIES, Classifier
from mta.config import Config
from mta.delivery.mx import make_sync_resolver
from mta.feedback import reports, verify
from mta.feedback.verp import ReturnPaths, Tagged
from mta.intake import Envelope
from mta.obs.log import event
from mta.replies import Reply
from mta.suppression import GLOBAL, SuppressionError, SuppressionList
from spool import Recipient, Record
from spool.ids import new_id
from spool.safeio import write_file

log = logging.getLogger(__name__)


class FeedbackReceiver:
    def __init__(self, paths: ReturnPaths, directory: Path, classifier: Classifier,
                 resolver: Callable[[], dns.resolver.Resolver], authserv_id: str,
                 suppressions: SuppressionList | None = None, scope: str = "global",
                 clock: Callable[[], float] = time.time) -> None:
        self.paths, self.directory, self.classifier = paths, directory, classifier
        self.resolver, self.authserv_id = resolver, authserv_id
        self.suppressions, self.scope, self.clock = suppressions, scope, clock

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
            reply = _reply(notice)
            category = self.classifier.classify(reply)
            common = {"queue_id": tagged.queue_id, "recipient": notice.recipient, "reply": str(reply),
                      "category": category.value, "source": "report", **fields}
            if notice.action == "delayed":
                event("deferred", **common)
                continue
            event("bounced", level=logging.WARNING, **common)
            if category in ADDRESS_CATEGORIES and fields["trusted"]:
                await self._suppress(notice.recipient, category.value, tagged.queue_id, str(reply), report)

    async def _complaint(self, report: reports.Report, tagged: Tagged, fields: dict[str, object]) -> None:
        recipient = tagged.recipient or report.complained
        event("complained", level=logging.WARNING, queue_id=tagged.queue_id, recipient=recipient,
              feedback_type=report.feedback_type or "abuse", sending_domain=report.sending_domain, **fields)
        if recipient and fields["trusted"]:
            await self._suppress(recipient, "complaint", tagged.queue_id, report.feedback_type or "abuse", report)

    async def _suppress(self, address: str, reason: str, queue_id: str, detail: str,
                        report: reports.Report) -> None:
        if self.suppressions is None:
            return
        scope = GLOBAL
        if self.scope == "sending_domain":
            domain = report.sending_domain
            if domain is None:
                event("feedback_unscoped", level=logging.WARNING, queue_id=queue_id, recipient=address,
                      reason="the report does not carry the original From: its sending domain is unknown")
                return
            scope = f"domain:{domain}"
        elif self.scope == "account":
            # Which account sent it is not in the return path nor in the report: nothing to scope by.
            event("feedback_unscoped", level=logging.WARNING, queue_id=queue_id, recipient=address,
                  reason="suppression.scope account: a report does not say which account sent the message")
            return
        try:
            entry = await asyncio.to_thread(self.suppressions.add, address, reason, "report", detail, scope)
        except SuppressionError as exc:
            log.error("queue_id=%s cannot suppress %s: %s", queue_id, address, exc)
            return
        event("suppression_added", queue_id=queue_id, recipient=address, reason=entry.reason, source="report",
              scope=scope, expires=entry.expires)


def _reply(notice: reports.Notice) -> Reply:
    """The reply a bounce reports, as far as it says: the code and text of its Diagnostic-Code."""
    text = notice.diagnostic
    code_text, _, rest = text.partition(" ")
    code = int(code_text) if code_text.isdigit() and len(code_text) == 3 else (
        550 if notice.status.startswith("5") else 450)
    enhanced = notice.status if notice.status[:1] in ("2", "4", "5") else ("5.0.0" if code >= 500 else "4.0.0")
    body = rest if code_text.isdigit() else text
    if body.startswith(enhanced):
        body = body[len(enhanced):].strip()
    return Reply(code, enhanced, body or "no diagnostic given")


def build(config: Config, suppressions: SuppressionList | None) -> tuple[ReturnPaths | None, FeedbackReceiver | None]:
    """The return paths and the receiver ``feedback`` asks for; (None, None) without ``feedback.domain``.

    ``OSError`` when the secret file cannot be read (the caller names the key)."""
    settings = config.feedback
    if settings.domain is None or settings.secret_file is None:
        return None, None
    key = settings.secret_file.read_bytes().strip()
    paths = ReturnPaths(settings.domain, key)
    receiver = FeedbackReceiver(paths, config.spool.path / "feedback", config.bounces.classifier(),
                                lambda: make_sync_resolver(config.dns.servers, config.dns.timeout),
                                config.authserv_id or config.hostname, suppressions, config.suppression.scope)
    return paths, receiver
