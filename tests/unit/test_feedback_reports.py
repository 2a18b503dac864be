"""Signed return paths and the reading of reports: our own examples and real DSNs from a public corpus.

The corpus is CPython's email test data as Debian ships it
(``libpython3.11-testsuite``): msg_43.txt is a spam firewall's DSN for 25
recipients; msg_25.txt a sendmail DSN whose boundary parameter is cut short.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mta.bounce.classify import Category, Classifier
from mta.feedback import reports
from mta.feedback.verp import ReturnPaths, Tagged
from tests.ci import require

CORPUS = Path("/usr/lib/python3.11/test/test_email/data")
PATHS = ReturnPaths("bounces.example.com", b"test key, not a secret")


def test_a_return_path_names_its_message_and_recipient_and_cannot_be_forged() -> None:
    one = PATHS.sender("AbC123", ["alice.smith+news@example.org"])
    assert one.startswith("bounce+AbC123-") and one.endswith("=alice.smith+news=example.org@bounces.example.com")
    assert PATHS.parse(one) == Tagged("AbC123", "alice.smith+news@example.org")
    assert PATHS.parse(one.upper().replace("BOUNCES.EXAMPLE.COM", "bounces.example.com")) is None  # the tag is exact
    assert PATHS.parse(one.replace("alice.smith", "bob")) is None  # another recipient: the tag does not verify
    assert PATHS.parse(one.replace("AbC123", "AbC124")) is None
    assert ReturnPaths("bounces.example.com", b"other key").parse(one) is None
    assert PATHS.parse(one.replace("bounces.example.com", "elsewhere.example")) is None
    several = PATHS.sender("AbC123", ["a@example.org", "b@example.org"])
    assert PATHS.parse(several) == Tagged("AbC123", None)
    long_local = "x" * 60 + "@example.org"  # VERP would pass 64 octets: the message-wide form
    assert PATHS.parse(PATHS.sender("AbC123", [long_local])) == Tagged("AbC123", None)
    assert len(PATHS.sender("AbC123", [long_local]).partition("@")[0]) <= 64
    assert PATHS.parse(PATHS.sender("AbC123", ["jörg@example.org"])) == Tagged("AbC123", None)


@pytest.fixture
def corpus() -> Path:
    require((CORPUS / "msg_43.txt").is_file(), f"the corpus in {CORPUS} (libpython3.11-testsuite) is missing")
    return CORPUS


def test_a_real_dsn_for_25_recipients_is_25_content_bounces(corpus: Path) -> None:
    report = reports.read((corpus / "msg_43.txt").read_bytes())
    assert report.kind == "bounce" and report.reporter == "sacspam01.dot.ca.gov"
    assert len(report.notices) == 25 and {n.action for n in report.notices} == {"failed"}
    first = report.notices[0]
    assert first.recipient == "xxxxxxx@dot.ca.gov" and first.status == "5.7.1"
    reply = first.reply
    assert (reply.code, reply.enhanced) == (550, "5.7.1") and reply.text.startswith("Message content rejected")
    assert Classifier().classify(reply) is Category.CONTENT_REJECTED


def test_a_dsn_with_a_broken_boundary_and_no_diagnostic_still_names_its_recipient(corpus: Path) -> None:
    report = reports.read((corpus / "msg_25.txt").read_bytes())
    assert report.kind == "bounce" and report.reporter == "zinfandel.lacita.com"
    [notice] = report.notices
    assert (notice.recipient, notice.status, notice.diagnostic) == ("scoffman@wellpartner.com", "5.4.6", "")
    reply = notice.reply
    assert (reply.code, reply.enhanced) == (550, "5.4.6")


def test_not_a_report_is_other_and_delivered_blocks_are_left_out() -> None:
    assert reports.read(b"From: a@b.example\r\nSubject: out of office\r\n\r\nback monday\r\n").kind == "other"
    dsn = (b"Content-Type: multipart/report; report-type=delivery-status; boundary=b\r\n\r\n--b\r\n"
           b"Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example\r\n\r\n"
           b"Final-Recipient: rfc822; ok@example.org\r\nAction: delivered\r\nStatus: 2.0.0\r\n\r\n"
           b"Final-Recipient: rfc822; late@example.org\r\nAction: delayed\r\nStatus: 4.4.7\r\n\r\n--b--\r\n")
    report = reports.read(dsn)
    assert [(n.recipient, n.action) for n in report.notices] == [("late@example.org", "delayed")]
