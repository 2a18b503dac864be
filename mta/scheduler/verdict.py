"""What a delivery round's outcomes mean for each recipient of a message.

The scheduler hands over the outcomes the courier reported; ``judge`` sets
each pending recipient's final or interim state and last reply, logs the
``delivered``/``bounced``/``deferred`` event with the bounce category,
adds the round to the record's bounded attempt history (``mta queue
trace``), and says who needs a notice (refused, or relayed to a server that takes no DSN
request) and which addresses a receiver called dead (for the suppression
list).  ``fail_pending`` does the same for recipients that the queue gives
up on: the message expired, or an operator returned it.

Nothing here touches the spool or the network: the scheduler persists what
was decided (``Scheduler.conclude``).  It cannot fail on a well-formed
record; a recipient without an outcome keeps its state.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mta import replies
from mta.bounce.classify import ADDRESS_CATEGORIES, Category, Classifier
from mta.bounce.dsn import ReportedRecipient
from mta.delivery.result import Kind, Outcome
from mta.obs.log import event
from spool import Record
from spool.record import DELIVERED, FAILED, PENDING


@dataclass
class Verdict:
    failed: list[ReportedRecipient] = field(default_factory=list)
    relayed: list[ReportedRecipient] = field(default_factory=list)  # delivered where no DSN request could go
    dead: list[tuple[str, Category, str]] = field(default_factory=list)  # (address, category, reply)


def judge(record: Record, outcomes: Mapping[str, Outcome], now: float, classifier: Classifier) -> Verdict:
    """Apply one round's ``outcomes`` to ``record``'s pending recipients (``record.attempts`` already counts it)."""
    verdict = Verdict()
    tried: list[dict[str, Any]] = []
    for rcpt in record.recipients:
        outcome = outcomes.get(rcpt.address)
        if outcome is None or rcpt.state != PENDING:
            continue
        tried.append(_attempted(rcpt.address, outcome))
        rcpt.last_reply, rcpt.remote, rcpt.updated = str(outcome.reply), outcome.remote, now
        fields = {"queue_id": record.id, **_submitter(record), "sender": record.sender or "<>",
                  "recipient": rcpt.address,
                  **outcome.log_fields(), "delay": round(now - record.created, 3),
                  "size": record.size, "attempts": record.attempts}
        if outcome.kind is Kind.DELIVERED:
            rcpt.state = DELIVERED
            event("delivered", **fields)
            if not outcome.dsn_passed:
                verdict.relayed.append(ReportedRecipient(rcpt.address, outcome.enhanced, str(outcome.reply),
                                                         outcome.remote, answered=outcome.answered))
        elif outcome.kind is Kind.PERMANENT:
            rcpt.state = FAILED
            category = classifier.classify(outcome.reply)
            verdict.failed.append(ReportedRecipient(rcpt.address, outcome.enhanced, str(outcome.reply),
                                                    outcome.remote, answered=outcome.answered,
                                                    category=category.value))
            event("bounced", level=logging.WARNING, category=category.value, **fields)
            if category in ADDRESS_CATEGORIES:
                verdict.dead.append((rcpt.address, category, str(outcome.reply)))
        else:
            event("deferred", category=classifier.classify(outcome.reply).value, **fields)
    if tried:
        record.remember(now, tried)
    return verdict


def _submitter(record: Record) -> dict[str, str]:
    """Who submitted it (the account or workload, and its namespace), for the events that follow the message."""
    return {key: str(record.attrs[key]) for key in ("user", "namespace") if record.attrs.get(key)}


def _attempted(address: str, outcome: Outcome) -> dict[str, Any]:
    """One recipient's part of a round, as ``mta queue trace`` shows it."""
    tls = {"version": outcome.tls.version, "cipher": outcome.tls.cipher} if outcome.tls is not None else None
    return {"address": address, "mx_host": outcome.mx_host, "mx_ip": outcome.mx_ip, "tls": tls,
            "reply": str(outcome.reply), "answered": outcome.answered}


def fail_pending(record: Record, now: float, classifier: Classifier, *, expired: bool) -> list[ReportedRecipient]:
    """Every recipient still pending fails: the message expired, or an operator returned it."""
    failed = []
    for rcpt in record.pending():
        # An expired recipient's category is its last reply's ("mailbox_full" after days of 452 4.2.2).
        last = replies.parse(rcpt.last_reply) if expired and rcpt.last_reply else None
        category = classifier.classify(last) if last is not None else \
            Category.TRANSIENT if expired else Category.OTHER
        if expired:
            status, why = "4.4.7", f"4.4.7 message expired after {int(now - record.created)}s in the queue"
            reply = f"{why}; last reply: {rcpt.last_reply}" if rcpt.last_reply else why
        else:
            status = "5.0.0"
            reply = "5.0.0 message returned to sender by the administrator"
        rcpt.state, rcpt.last_reply, rcpt.updated = FAILED, reply, now
        failed.append(ReportedRecipient(rcpt.address, status, reply, rcpt.remote if expired else None, expired,
                                        category=category.value))
        event("expired" if expired else "bounced", level=logging.WARNING, queue_id=record.id,
              sender=record.sender or "<>", recipient=rcpt.address, reply=reply, category=category.value,
              enhanced=status, delay=round(now - record.created, 3),
              size=record.size, attempts=record.attempts)
    return failed
