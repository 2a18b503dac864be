"""What an authenticated client may send: its senders, From: addresses, sizes and rates.

Patterns are an exact address, ``@domain`` (any address at that domain) or
``*``.  Rates are counted per user name in the limits store (``mta.limits``:
this process, or the Redis every pod shares): messages in the last minute
and recipients in the last 24 hours.  A transaction reserves its share at MAIL (one message) and RCPT (its
recipients so far), so transactions running in parallel see each other's
reservations (those of this pod: other pods see a reservation once it is
a count); the reservation becomes a count at ``250`` (``commit``) and is
given back when the transaction ends any other way (``release``: RSET,
HELO/EHLO, a refused DATA, a disconnect).  Memory: one reservation per
open transaction.
Failure: ``Rejected`` with ``553 5.7.1`` for a forbidden sender or From:,
``552 5.3.4`` for size, ``452 4.5.3`` for too many recipients,
``451 4.7.1`` past a rate.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from email.utils import getaddresses

from mta import message, replies
from mta.config import AccountPolicy
from mta.limits.store import LimitsStore, LocalStore
from mta.replies import Rejected

MESSAGE_WINDOW = 60.0  # messages_per_minute
RECIPIENT_WINDOW = 86400.0  # recipients_per_day
COUNTED = 1 << 30  # what is committed always counts: a limit no rate reaches


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


def check_message(policy: AccountPolicy, data: bytes) -> None:
    """After the content policy (``mta.content``), at DATA or an API submission: size and From: addresses."""
    check_size(policy, len(data))
    if policy.from_addresses == ["*"]:
        return
    header, _ = message.split_header(data)
    values = [f.split(b":", 1)[1].decode("utf-8", "replace")
              for f in message.header_fields(header) if f.lower().startswith(b"from:")]
    check_from_header(policy, values)


def check_recipient_count(policy: AccountPolicy, count: int) -> None:
    """``count``: recipients already accepted in this transaction."""
    if policy.max_recipients is not None and count >= policy.max_recipients:
        raise Rejected(replies.TOO_MANY_RECIPIENTS)


class RateLimits:
    """Sliding-window counts per user name, and the reservations of transactions under way.

    A reservation is keyed by its ``holder`` (the SMTP session): a session
    has at most one transaction, so a new MAIL replaces what it held."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, store: LimitsStore | None = None) -> None:
        self.store: LimitsStore = store or LocalStore(clock)
        self._holds: dict[object, _Hold] = {}
        self._held_messages: collections.Counter[str] = collections.Counter()
        self._held_recipients: collections.Counter[str] = collections.Counter()

    async def hold_message(self, policy: AccountPolicy, user: str, holder: object) -> None:
        """At MAIL: reserve one message of ``user``'s rate, or raise ``Rejected`` (451 4.7.1)."""
        self.release(holder)
        if policy.messages_per_minute is not None:
            sent = await self.store.count(f"account-messages:{user}", MESSAGE_WINDOW)
            # No await from here to the reservation: sessions of this process see each other's.
            if sent + self._held_messages[user] >= self.store.share(policy.messages_per_minute):
                raise Rejected(replies.RATE_MESSAGES, f"user {user}")
        self._holds[holder] = _Hold(user)
        self._held_messages[user] += 1

    async def hold_recipients(self, policy: AccountPolicy, user: str, holder: object, count: int) -> None:
        """At RCPT: reserve ``count`` recipients in all for this transaction, or raise ``Rejected``."""
        used = 0
        if policy.recipients_per_day is not None:
            used = await self.store.count(f"account-recipients:{user}", RECIPIENT_WINDOW)
        hold = self._holds.get(holder)
        if hold is None or hold.user != user:  # no MAIL of this user held: nothing to add to
            hold = _Hold(user)
            self._holds[holder] = hold
            self._held_messages[user] += 1
        if policy.recipients_per_day is not None:
            others = self._held_recipients[user] - hold.recipients
            if used + others + count > self.store.share(policy.recipients_per_day):
                raise Rejected(replies.RATE_RECIPIENTS, f"user {user}")
        self._held_recipients[user] += count - hold.recipients
        hold.recipients = count

    async def commit(self, holder: object, recipients: int) -> None:
        """At ``250``: the held message counts now, with the recipients it was queued for."""
        hold = self._holds.get(holder)
        if hold is None:
            return
        # Counted before the reservation goes: a MAIL meanwhile sees one or the other, never neither.
        await self.store.take(f"account-messages:{hold.user}", COUNTED, MESSAGE_WINDOW)
        if recipients:
            await self.store.take(f"account-recipients:{hold.user}", COUNTED, RECIPIENT_WINDOW, recipients)
        if self._holds.get(holder) is hold:
            self.release(holder)

    def release(self, holder: object) -> None:
        """The transaction ended without ``250``: give its reservation back (nothing held: no-op)."""
        hold = self._holds.pop(holder, None)
        if hold is None:
            return
        _decrement(self._held_messages, hold.user, 1)
        _decrement(self._held_recipients, hold.user, hold.recipients)

    def held(self, user: str) -> tuple[int, int]:
        """Messages and recipients reserved by ``user``'s transactions under way."""
        return self._held_messages[user], self._held_recipients[user]


@dataclass
class _Hold:
    user: str
    recipients: int = 0


def _decrement(counter: collections.Counter[str], key: str, amount: int) -> None:
    counter[key] -= amount
    if counter[key] <= 0:
        del counter[key]  # users seen once must not pile up
