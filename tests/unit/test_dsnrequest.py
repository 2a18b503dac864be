"""The DSN request (RFC 3461): parsing, xtext both ways, the spool form, the next hop's parameters."""

from __future__ import annotations

import pytest

from mta.dsnrequest import (
    DEFAULT_NOTIFY,
    MailRequest,
    RecipientRequest,
    parse_mail,
    parse_recipient,
    xtext_decode,
    xtext_encode,
)
from mta.replies import Rejected


def test_xtext_decodes_hexchars_and_encodes_what_must_be() -> None:
    assert xtext_decode("a+2Bb+3Dc+20d", "ENVID") == "a+b=c d"
    assert xtext_decode("lower+2bcase", "ENVID") == "lower+case"  # as Postfix takes it
    for text in ("plain", "a+b=c d", "+", "tab\there", "ü"):
        assert xtext_decode(xtext_encode(text), "X", unicode=True) == text
    assert xtext_encode("a+b=c d") == "a+2Bb+3Dc+20d"
    for bad in ("a+", "a+4", "a+GG", "tab\t", "ü"):
        with pytest.raises(Rejected) as caught:
            xtext_decode(bad, "ENVID")
        assert caught.value.reply.code == 501 and caught.value.reply.enhanced == "5.5.4"
        assert "ENVID" in caught.value.reply.text


def test_mail_parameters() -> None:
    assert parse_mail([("RET", "hdrs"), ("ENVID", "ID+2B1")]) == MailRequest("HDRS", "ID+1")
    assert parse_mail([]) == MailRequest()
    for params in ([("RET", "BODY")], [("RET", "FULL"), ("RET", "HDRS")], [("ENVID", "x" * 101)],
                   [("ENVID", "")], [("ENVID", "a+0Ab")]):  # +0A decodes to a line feed
        with pytest.raises(Rejected):
            parse_mail(params)


def test_recipient_parameters() -> None:
    assert parse_recipient([("NOTIFY", "success,Delay")]).notify == {"SUCCESS", "DELAY"}
    assert parse_recipient([("NOTIFY", "NEVER")]).notify == frozenset()
    assert parse_recipient([]).notifies == DEFAULT_NOTIFY == {"FAILURE"}
    assert parse_recipient([("ORCPT", "rfc822;Joe+2BTag@Example.COM")]).orcpt == "rfc822;Joe+Tag@Example.COM"
    # RFC 6533: the utf-8 address type with \x{HEX} escapes, or the characters themselves.
    assert parse_recipient([("ORCPT", "utf-8;j\\x{FC}rgen@example.com")]).orcpt == "utf-8;jürgen@example.com"
    assert parse_recipient([("ORCPT", "utf-8;jürgen@example.com")]).orcpt == "utf-8;jürgen@example.com"
    for params in ([("NOTIFY", "NEVER,FAILURE")], [("NOTIFY", "ALWAYS")], [("NOTIFY", "")],
                   [("ORCPT", "no-type@example.com")], [("ORCPT", "rfc 822;a@b")], [("ORCPT", "rfc822;")],
                   [("ORCPT", "rfc822;jürgen@example.com")], [("ORCPT", "rfc822;" + "a" * 500)],
                   [("NOTIFY", "FAILURE"), ("NOTIFY", "DELAY")]):
        with pytest.raises(Rejected):
            parse_recipient(params)


def test_the_spool_form_and_the_next_hops_parameters() -> None:
    mail = MailRequest("FULL", "id=1 +x")
    assert MailRequest.from_attrs(mail.to_attrs()) == mail
    assert mail.mail_options() == ["RET=FULL", "ENVID=id+3D1+20+2Bx"]
    assert MailRequest().to_attrs() == {} and MailRequest().mail_options() == []
    rcpt = RecipientRequest(frozenset({"DELAY", "SUCCESS"}), "rfc822;a+b@example.com")
    assert RecipientRequest.from_attrs(rcpt.to_attrs()) == rcpt
    assert rcpt.rcpt_options() == ["NOTIFY=SUCCESS,DELAY", "ORCPT=rfc822;a+2Bb@example.com"]
    assert RecipientRequest(frozenset()).rcpt_options() == ["NOTIFY=NEVER"]
    assert RecipientRequest(None, "utf-8;jürgen@example.com").rcpt_options() == ["ORCPT=utf-8;j\\x{FC}rgen@example.com"]
    # Garbage in a hand-edited spool file is ignored, not trusted.
    assert MailRequest.from_attrs({"ret": "BOGUS", "envid": 3}) == MailRequest()
    assert RecipientRequest.from_attrs({"notify": ["SUCCESS", "LOUD"], "orcpt": 1}) == \
        RecipientRequest(frozenset({"SUCCESS"}))
