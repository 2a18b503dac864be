"""The RCPT check against the suppression list (``mta.suppression``).

Owns what a session does with a suppressed recipient: with
``suppression.action: refuse`` it is refused with ``550 5.1.1`` and a text
that says it is suppressed and why (so a legacy app learns at once, in the
session); with ``hold`` it is accepted and the recipient is noted on the
envelope (``held_recipients``), so that the message is stored on hold for an
operator to release or delete.  A ``rejected`` event names the entry's
reason and source.

Failure: a suppression list that cannot be read lets the recipient through
(a broken list must not stop all mail) and logs ``suppression_unavailable``;
a refusal raises ``Rejected``.
"""

from __future__ import annotations

import logging
from typing import Any

from mta import replies
from mta.obs.log import event
from mta.replies import Rejected
from mta.suppression import SuppressionError, SuppressionList

HELD = "held_recipients"  # on the aiosmtpd envelope, then in the spool record's attrs


def check_for(suppressions: SuppressionList | None, listener: str) -> SuppressionCheck | None:
    return None if suppressions is None else SuppressionCheck(suppressions, listener)


class SuppressionCheck:
    def __init__(self, suppressions: SuppressionList, listener: str) -> None:
        self.suppressions = suppressions
        self.listener = listener
        self.hold = suppressions.settings.action == "hold"

    def __call__(self, envelope: Any, recipient: str, sender: str, user: str | None, client: str) -> None:
        """Refuse (or mark for hold) ``recipient`` if the list holds it for this sender or account."""
        domain = sender.strip("<>").rpartition("@")[2] if "@" in sender else None
        try:
            entry = self.suppressions.lookup(recipient, domain, user)
        except SuppressionError as exc:
            event("suppression_unavailable", level=logging.ERROR, listener=self.listener, reason=str(exc))
            return
        if entry is None:
            return
        if self.hold:
            held = getattr(envelope, HELD, None) or []
            held.append(recipient)
            envelope.held_recipients = held
            event("suppressed", level=logging.WARNING, listener=self.listener, client=client, recipient=recipient,
                  action="hold", reason=entry.reason, source=entry.source, scope=entry.scope)
            return
        reply = replies.suppressed(entry.why)
        event("rejected", level=logging.WARNING, listener=self.listener, client=client, recipient=recipient,
              reply=str(reply), reason="suppressed", suppression_reason=entry.reason, source=entry.source,
              scope=entry.scope, user=user)
        raise Rejected(reply, f"suppressed: {entry.reason} ({entry.source})")


def held_attrs(envelope: Any) -> dict[str, list[str]]:
    """For the spool record: the suppressed recipients that put the message on hold, if any."""
    held = getattr(envelope, HELD, None)
    return {HELD: list(held)} if held else {}
