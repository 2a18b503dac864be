"""What hearing back means, whoever brought the news: events, and the suppression list.

Two sources tell kubemta later what became of its mail: reports that come
back by SMTP to the feedback listener (``mta.feedback.receiver``) and the
event webhooks of email service providers (``mta.feedback.esp``).  Both
hand each recipient's news here, so that both land in the same place:

- a bounce is classified (``mta.bounce.classify``) and emitted as
  ``bounced`` (or ``deferred`` for a delay) with its ``source``;
- a complaint is emitted as ``complained``;
- a delivery an ESP confirms is emitted as ``delivered``;
- only trusted news suppresses (a report whose SPF or DKIM passed, an ESP
  event whose signature was checked): a bounce whose category is about the
  address, a complaint always.  The scope follows ``suppression.scope``:
  ``sending_domain`` takes the original message's From domain.

Failure: a suppression error is logged and the event still goes out; news
whose scope cannot be known (``account``, or no sending domain) is logged as
``feedback_unscoped`` and suppresses nothing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from mta.bounce.classify import ADDRESS_CATEGORIES, Category, Classifier
from mta.obs.log import event
from mta.replies import Reply
from mta.suppression import GLOBAL, SuppressionError, SuppressionList

log = logging.getLogger(__name__)


class FeedbackActions:
    def __init__(self, classifier: Classifier, suppressions: SuppressionList | None, scope: str) -> None:
        self.classifier, self.suppressions, self.scope = classifier, suppressions, scope

    async def bounced(self, recipient: str, reply: Reply, *, delayed: bool, trusted: bool, source: str,
                      queue_id: str | None, sending_domain: str | None, **fields: Any) -> Category:
        category = self.classifier.classify(reply)
        common = {"queue_id": queue_id, "recipient": recipient, "reply": str(reply), "category": category.value,
                  "source": source, "trusted": trusted, "sending_domain": sending_domain, **fields}
        if delayed:
            event("deferred", **common)
            return category
        event("bounced", level=logging.WARNING, **common)
        if category in ADDRESS_CATEGORIES and trusted:
            await self.suppress(recipient, category.value, str(reply), source=source, queue_id=queue_id,
                                sending_domain=sending_domain)
        return category

    async def complained(self, recipient: str | None, *, feedback_type: str, trusted: bool, source: str,
                         queue_id: str | None, sending_domain: str | None, **fields: Any) -> None:
        event("complained", level=logging.WARNING, queue_id=queue_id, recipient=recipient,
              feedback_type=feedback_type, sending_domain=sending_domain, source=source, trusted=trusted, **fields)
        if recipient and trusted:
            await self.suppress(recipient, "complaint", feedback_type, source=source, queue_id=queue_id,
                                sending_domain=sending_domain)

    def delivered(self, recipient: str, reply: str, *, source: str, sending_domain: str | None,
                  **fields: Any) -> None:
        event("delivered", recipient=recipient, reply=reply, source=source, sending_domain=sending_domain, **fields)

    async def suppress(self, address: str, reason: str, detail: str, *, source: str, queue_id: str | None,
                       sending_domain: str | None) -> None:
        if self.suppressions is None:
            return
        scope = GLOBAL
        if self.scope == "sending_domain":
            if sending_domain is None:
                event("feedback_unscoped", level=logging.WARNING, queue_id=queue_id, recipient=address,
                      source=source, reason="the news does not carry the original From: its sending domain "
                      "is unknown")
                return
            scope = f"domain:{sending_domain}"
        elif self.scope == "account":
            # Which account sent it is in neither a return path, a report nor an ESP event.
            event("feedback_unscoped", level=logging.WARNING, queue_id=queue_id, recipient=address,
                  source=source, reason="suppression.scope account: later news does not say which account "
                  "sent the message")
            return
        try:
            entry = await asyncio.to_thread(self.suppressions.add, address, reason, source, detail, scope)
        except SuppressionError as exc:
            log.error("queue_id=%s cannot suppress %s: %s", queue_id, address, exc)
            return
        event("suppression_added", queue_id=queue_id, recipient=address, reason=entry.reason, source=source,
              scope=scope, expires=entry.expires)
