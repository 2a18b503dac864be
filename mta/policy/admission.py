"""Admission: whether a listener takes new mail at all, asked at MAIL FROM.

Owns the checks that refuse a transaction before it starts for reasons of
this server rather than of the message: today, free space on the spool
(the disk guard's reading, ``mta.obs.disk``), answered ``452 4.3.1`` so a
client tries again later or elsewhere while delivery frees space.

Failure: a check raises ``Rejected``; it logs a ``rejected`` event first,
since no transaction exists yet for the session to log it with.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from mta import replies
from mta.obs.log import event
from mta.replies import Rejected

# A check run at MAIL FROM before a transaction starts: it raises
# ``Rejected`` to refuse new mail.
Admission = Callable[[], None]


def storage(space: Callable[[], tuple[bool, str]], listener: str) -> Admission:
    """Refuse new mail on ``listener`` while ``space()`` says the spool is below its reserve."""

    def check() -> None:
        ok, detail = space()
        if not ok:
            event("rejected", level=logging.WARNING, listener=listener, reply=str(replies.INSUFFICIENT_STORAGE),
                  reason=detail)
            raise Rejected(replies.INSUFFICIENT_STORAGE, detail)

    return check
