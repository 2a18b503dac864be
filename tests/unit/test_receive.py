"""What the receive step adds to and normalises in a message."""

from __future__ import annotations

from datetime import UTC, datetime

from mta import message, receive

ARRIVAL = receive.Arrival(queue_id="QID1", helo="client.example", client_ip="192.0.2.7",
                          hostname="mta.example.com", protocol="ESMTP", recipients=("r@example.net",),
                          when=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))


def test_bare_cr_and_lf_become_crlf_and_a_final_crlf_is_added() -> None:
    assert message.normalise(b"a\nb\rc\r\nd") == b"a\r\nb\r\nc\r\nd\r\n"


def test_received_header_first_and_missing_ids_added() -> None:
    out = receive.prepare(b"From: a@example.com\r\nSubject: s\r\n\r\nbody\r\n", ARRIVAL)
    lines = out.split(b"\r\n")
    assert lines[0] == b"Received: from client.example ([192.0.2.7])"
    assert lines[1] == b"\tby mta.example.com (kubemta) with ESMTP id QID1"
    assert lines[2] == b"\tfor <r@example.net>; Fri, 02 Jan 2026 03:04:05 +0000"
    header, body = message.split_header(out)
    assert b"\r\nMessage-ID: <" in header and header.count(b"Date: ") == 1
    assert body == b"\r\nbody\r\n"


def test_existing_message_id_and_date_are_kept() -> None:
    original = b"Message-ID: <x@y>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nbody\r\n"
    out = receive.prepare(original, ARRIVAL)
    assert out.endswith(original)
    assert out.count(b"Message-ID") == 1


def test_text_without_header_is_kept_as_body() -> None:
    out = receive.prepare(b"just text\r\n\r\nmore\r\n", ARRIVAL)
    header, body = message.split_header(out)
    assert body == b"\r\njust text\r\n\r\nmore\r\n"
    assert b"Message-ID" in header


def test_client_text_cannot_break_the_trace_header() -> None:
    evil = receive.Arrival(**{**ARRIVAL.__dict__, "helo": "x\r\nBcc: victim@example.com"})
    header = receive.received_header(evil)
    assert header.count(b"\r\n") == 3 and b"\r\nBcc" not in header


def test_authenticated_mail_gets_our_results_and_forged_ones_are_removed() -> None:
    arrival = receive.Arrival(**{**ARRIVAL.__dict__, "auth_user": "billing", "protocol": "ESMTPSA"})
    forged = (b"Authentication-Results: mta.example.com; auth=pass smtp.auth=ceo\r\n"
              b"authentication-results: MTA.EXAMPLE.COM.;\r\n\tdkim=pass header.d=bank.example\r\n"
              b"Authentication-Results: mta.example.com (garbage that does not parse\r\n"
              b"Authentication-Results: other.example; spf=pass smtp.mailfrom=x@y.example\r\n"
              b"Subject: s\r\n\r\nbody\r\n")
    out = receive.prepare(forged, arrival)
    header, _ = message.split_header(out)
    assert out.startswith(b"Authentication-Results: mta.example.com; auth=pass smtp.auth=billing\r\n")
    assert header.count(b"mta.example.com;") == 1 and b"smtp.auth=ceo" not in out and b"bank.example" not in out
    assert b"garbage" not in out
    assert b"Authentication-Results: other.example; spf=pass" in header


def test_unauthenticated_mail_gets_no_results_but_forgeries_still_go() -> None:
    out = receive.prepare(b"Authentication-Results: mta.example.com; auth=pass smtp.auth=x\r\n\r\nb\r\n", ARRIVAL)
    assert b"Authentication-Results" not in out
