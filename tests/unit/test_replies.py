"""Every reply a client sees carries an enhanced status code."""

from __future__ import annotations

import pytest

from mta import replies
from mta.smtp.enhanced import add_enhanced_code
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
    assert add_enhanced_code(line) == expected


def test_exceptions_map_to_generic_replies() -> None:
    assert str(replies.for_exception(SpoolError("disk on fire"))) == "451 4.3.0 Requested action aborted: " \
        "local error in processing"
    assert replies.for_exception(RuntimeError("internal detail")).code == 451
    rejected = replies.Rejected(replies.RELAY_DENIED, "client 1.2.3.4")
    assert str(replies.for_exception(rejected)) == "554 5.7.1 Relay access denied"


@pytest.mark.parametrize(
    ("code", "message", "expected"),
    [
        (250, "2.0.0 Ok: queued as 4VB", replies.Reply(250, "2.0.0", "Ok: queued as 4VB")),
        (550, "5.1.1 <x@y>: Recipient\n address rejected",
         replies.Reply(550, "5.1.1", "<x@y>: Recipient address rejected")),
        (250, "Ok", replies.Reply(250, "", "Ok")),
        (450, "5.1.1 wrong class", replies.Reply(450, "", "5.1.1 wrong class")),
    ],
)
def test_server_replies_are_typed(code: int, message: str, expected: replies.Reply) -> None:
    reply = replies.from_server(code, message)
    assert reply == expected
    assert replies.parse(str(reply)) == reply


def test_status_falls_back_to_the_class() -> None:
    assert replies.Reply(250, "", "Ok").status == "2.0.0"
    assert replies.Reply(451, "", "later").status == "4.0.0"
    assert replies.parse("not a reply") is None
    assert replies.parse("4.4.7 message expired") is None
