"""What an authenticated client may send: its senders, From: addresses, sizes and rates.

Patterns are an exact address, ``@domain`` (any address at that domain) or
``*``.  Rates are counted per user name in this process: messages in the
last minute and recipients in the last 24 hours (``mta.sliding_window``).
Failure: ``Rejected`` with ``553 5.7.1`` for a forbidden sender or From:,
``552 5.3.4`` for size, ``452 4.5.3`` for too many recipients,
``451 4.7.1`` past a rate.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from email.utils import getaddresses

from mta import replies
from mta.config import AccountPolicy
from mta.replies import Rejected
from mta.sliding_window import SlidingWindow

MESSAGE_WINDOW = 60.0  # messages_per_minute
RECIPIENT_WINDOW = 86400.0  # recipients_per_day


def allowed(address: str, patterns: Iterable[str]) -> bool:
    address = address.lower()
    domain = "@" + address.rpartition("@")[2]
    return any(p == "*" or p in (address, domain) for p in patterns)


def check_sender(policy: AccountPolicy, sender: str) -> None:
    # The null sender is for bounces, which accounts do not send.
    if not sender or sender == "<>" or not allowed(sender, policy.senders):
        raise Rejected(replies.SENDER_FORBIDDEN, f"envelope sender {sender!r}")


def check_from_header(policy: AccountPolicy, header_values: list[str]) -> None:
    if policy.from_addresses == ["*"]:
        return
    addresses = [addr for _, addr in getaddresses(header_values) if addr]
    if not addresses:
        raise Rejected(replies.FROM_MISSING)
    for addr in addresses:
        if not allowed(addr, policy.from_addresses):
            raise Rejected(replies.FROM_FORBIDDEN, f"From: {addr!r}")


def check_size(policy: AccountPolicy, size: int) -> None:
    if policy.max_message_size is not None and size > policy.max_message_size:
        raise Rejected(replies.ACCOUNT_TOO_BIG, f"{size} bytes")


def check_recipient_count(policy: AccountPolicy, count: int) -> None:
    """``count``: recipients already accepted in this transaction."""
    if policy.max_recipients is not None and count >= policy.max_recipients:
        raise Rejected(replies.TOO_MANY_RECIPIENTS)


class RateLimits:
    """Sliding-window counters per user name."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._messages: dict[str, SlidingWindow] = {}
        self._recipients: dict[str, SlidingWindow] = {}  # weighted by recipients per message

    def check_message(self, policy: AccountPolicy, user: str) -> None:
        messages = self._messages.get(user)
        sent = messages.count(self.clock()) if messages is not None else 0
        if policy.messages_per_minute is not None and sent >= policy.messages_per_minute:
            raise Rejected(replies.RATE_MESSAGES, f"user {user}")

    def check_recipients(self, policy: AccountPolicy, user: str, adding: int) -> None:
        recipients = self._recipients.get(user)
        used = recipients.total(self.clock()) if recipients is not None else 0
        if policy.recipients_per_day is not None and used + adding > policy.recipients_per_day:
            raise Rejected(replies.RATE_RECIPIENTS, f"user {user}")

    def record(self, user: str, recipients: int) -> None:
        now = self.clock()
        self._messages.setdefault(user, SlidingWindow(MESSAGE_WINDOW)).add(now)
        self._recipients.setdefault(user, SlidingWindow(RECIPIENT_WINDOW)).add(now, recipients)
