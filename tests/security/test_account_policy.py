"""Per-account policy for authenticated clients: senders, From:, sizes, recipients, rates."""

from __future__ import annotations

import smtplib

import pytest

from tests.conftest import World
from tests.security.conftest import PASSWORD, Secure, make_secure

POLICY = {
    "accounts": {
        "default": {"senders": ["*"], "from_addresses": ["*"]},
        "users": {
            "billing": {
                "senders": ["billing@sender.test", "@billing.sender.test"],
                "from_addresses": ["@sender.test"],
                "max_message_size": "2K",
                "max_recipients": 2,
                "messages_per_minute": 3,
                "recipients_per_day": 5,
            }
        },
    }
}


@pytest.fixture
def policed(world: World) -> Secure:
    return make_secure(world, POLICY, users={"billing": PASSWORD, "app": PASSWORD})


def billing(secure: Secure) -> smtplib.SMTP:
    client = secure.client(secure.submission, tls=True)
    client.login("billing", PASSWORD)
    return client


def message(sender: str = "Billing <billing@sender.test>", body: str = "hi") -> bytes:
    return f"From: {sender}\r\nTo: a@dest.test\r\nSubject: s\r\n\r\n{body}\r\n".encode()


@pytest.mark.parametrize("sender", ["other@sender.test", "billing@evil.test", "x@sender.test", "<>"])
def test_envelope_sender_outside_the_account_is_refused(policed: Secure, sender: str) -> None:
    with billing(policed) as client:
        code, text = client.docmd(f"MAIL FROM:<{sender.strip('<>')}>")
        assert (code, text[:5]) == (553, b"5.7.1")
    assert policed.server.queue_list() == []


@pytest.mark.parametrize("sender", ["billing@sender.test", "anyone@billing.sender.test"])
def test_allowed_senders_pass(policed: Secure, sender: str) -> None:
    sink = policed.world.sink("dest")
    with billing(policed) as client:
        client.sendmail(sender, ["a@dest.test"], message())
    sink.wait_for_messages(1, timeout=20)


@pytest.mark.parametrize("header_from", ["Evil <ceo@evil.test>", "billing@sender.test, ceo@evil.test", ""])
def test_from_header_outside_the_account_is_refused_and_never_queued(policed: Secure, header_from: str) -> None:
    with billing(policed) as client:
        client.mail("billing@sender.test")
        client.rcpt("a@dest.test")
        data = message(header_from) if header_from else b"Subject: no from\r\n\r\nbody\r\n"
        code, text = client.data(data)
        assert (code, text[:5]) == (553, b"5.7.1")
    assert policed.server.queue_list() == []


def test_account_size_and_recipient_limits(policed: Secure) -> None:
    with billing(policed) as client:
        client.mail("billing@sender.test")
        assert client.rcpt("a@dest.test")[0] == 250
        assert client.rcpt("b@dest.test")[0] == 250
        assert client.rcpt("c@dest.test")[:1] == (452,)
        code, text = client.data(message(body="x" * 70 + "\r\n" * 1 + ("y" * 70 + "\r\n") * 40))
        assert (code, text[:5]) == (552, b"5.3.4")
    assert policed.server.queue_list() == []


def test_message_rate_limit_answers_451(policed: Secure) -> None:
    policed.world.sink("dest")
    with billing(policed) as client:
        for _ in range(3):
            client.sendmail("billing@sender.test", ["a@dest.test"], message())
        code, text = client.docmd("MAIL FROM:<billing@sender.test>")
        assert (code, text[:5]) == (451, b"4.7.1")
    # Another account is not affected.
    with policed.client(policed.submission, tls=True) as client:
        client.login("app", PASSWORD)
        client.sendmail("app@anything.test", ["a@dest.test"], message("app@anything.test"))


def test_daily_recipient_limit_answers_451(world: World) -> None:
    policy = {"accounts": {"users": {"bulk": {"recipients_per_day": 3}}}}
    secure = make_secure(world, policy, users={"bulk": PASSWORD})
    secure.world.sink("dest")
    with secure.client(secure.submission, tls=True) as client:
        client.login("bulk", PASSWORD)
        client.sendmail("bulk@sender.test", ["a@dest.test", "b@dest.test"], message("bulk@sender.test"))
        client.mail("bulk@sender.test")
        assert client.rcpt("c@dest.test")[0] == 250
        code, text = client.rcpt("d@dest.test")
        assert (code, text[:5]) == (451, b"4.7.1")
