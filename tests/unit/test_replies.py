"""Every reply a client sees carries an enhanced status code."""

from __future__ import annotations

import pytest

from mta.smtp import replies
from spool import SpoolError


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('500 Error: command "FOO" not recognized', '500 5.5.2 Error: command "FOO" not recognized'),
        ("503 Error: need MAIL command", "503 5.5.1 Error: need MAIL command"),
        ("250 OK", "250 2.0.0 OK"),
        ("221 Bye", "221 2.0.0 Bye"),
        ("552 Error: Too much mail data", "552 5.3.4 Error: Too much mail data"),
        ("553 5.1.3 Error: malformed address", "553 5.1.3 Error: malformed address"),
        ("354 End data with <CR><LF>.<CR><LF>", "354 End data with <CR><LF>.<CR><LF>"),
    ],
)
def test_enhanced_codes_are_added_where_missing(line: str, expected: str) -> None:
    assert replies.add_enhanced_code(line) == expected


def test_exceptions_map_to_generic_replies() -> None:
    assert str(replies.for_exception(SpoolError("disk on fire"))) == "451 4.3.0 Requested action aborted: " \
        "local error in processing"
    assert replies.for_exception(RuntimeError("internal detail")).code == 451
    rejected = replies.Rejected(replies.RELAY_DENIED, "client 1.2.3.4")
    assert str(replies.for_exception(rejected)) == "554 5.7.1 Relay access denied"
