"""Delivery to a real Postfix: the message arrives intact, over TLS, from our HELO name."""

from __future__ import annotations

import smtplib

from tests.conftest import World

# Awkward on purpose: dot-stuffing candidates, a 998-octet line, 8-bit UTF-8,
# trailing white space, tabs, an empty last line.
BODY = (
    b"First line\r\n"
    b".a line that starts with a dot\r\n"
    b"..two dots\r\n"
    b".\tdot and tab\r\n"
    + b"x" * 998 + b"\r\n"
    b"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x93\xa8\r\n"
    b"trailing spaces   \r\n"
    b"\r\n"
)
HEADER = (
    b"From: App <app@sender.test>\r\n"
    b"To: someone@postfix.test\r\n"
    b"Subject: byte for byte\r\n"
    b"Date: Sat, 28 Nov 2026 10:00:00 +0000\r\n"
    b"Message-ID: <exact-1@sender.test>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
)
ADDED = (b"return-path:", b"delivered-to:", b"x-original-to:", b"received:")


def strip_trace(stored: bytes) -> bytes:
    """Drop the headers MTAs add on the way (with their continuation lines)."""
    lines = stored.split(b"\n")
    out, skipping, in_header = [], False, True
    for line in lines:
        if in_header and line == b"":
            in_header = False
        if in_header and line[:1] in (b" ", b"\t") and skipping:
            continue
        skipping = in_header and line.lower().startswith(ADDED)
        if not skipping:
            out.append(line)
    return b"\n".join(out)


def test_message_reaches_postfix_byte_for_byte(world: World) -> None:
    postfix = world.postfix()
    server = world.mta()
    with smtplib.SMTP("127.0.0.1", server.port, timeout=20) as client:
        client.ehlo("app.kubemta.test")
        client.sendmail("app@sender.test", ["someone@postfix.test"], HEADER + b"\r\n" + BODY,
                        mail_options=["BODY=8BITMIME"])
    [stored] = postfix.wait_for_mail("someone@postfix.test", 1, timeout=30)
    server.wait_queue_empty()
    # Maildir stores LF line endings; everything else must be exactly what the client sent.
    expected = (HEADER + b"\r\n" + BODY).replace(b"\r\n", b"\n")
    assert strip_trace(stored) == expected
    assert b"by mta.kubemta.test (kubemta) with ESMTP id" in stored
    log = postfix.log_text()
    assert "TLS connection established from" in log, log
    assert "status=sent (delivered to maildir)" in log
    # Postfix's own trace header: our HELO name, and TLS (ESMTPS) on the way in.
    assert b"Received: from mta.kubemta.test (" in stored
    assert b"with ESMTPS id" in stored
