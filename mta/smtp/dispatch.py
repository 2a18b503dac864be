"""Cheap session set-up: ``dir()`` that lists only aiosmtpd's dispatch names.

For every new connection aiosmtpd builds its tables of commands
(``smtp_*``), AUTH mechanisms (``auth_*``) and handler hooks (``handle_*``)
from ``dir()`` and ``inspect.getmembers()`` of the protocol object and the
handler, which fetches every attribute of both: about 140 µs a connection,
the largest single cost of a short SMTP session.  Classes that mix in
``DispatchNames`` answer ``dir()`` with just the names carrying those
prefixes, computed once per class, so aiosmtpd builds the same tables for a
fraction of the cost.  ``tests/unit/test_smtp_dispatch.py`` checks that the
tables stay identical to what a full ``dir()`` gives.

Failure: none at run time; a future aiosmtpd that looked up other names
this way would fail that test.
"""

from __future__ import annotations

import functools

PREFIXES = ("smtp_", "auth_", "handle_")


@functools.cache
def dispatch_names(cls: type) -> list[str]:
    return sorted(name for name in dir(cls) if name.startswith(PREFIXES))


class DispatchNames:
    def __dir__(self) -> list[str]:
        return dispatch_names(type(self))
