"""Per-account policy for authenticated clients: senders, From:, sizes, recipients, rates."""

from __future__ import annotations

import smtplib
import threading
import time
from typing import Any

import pytest

from tests.conftest import Fronts, World, limits_store
from tests.obs.logs import events
from tests.peers.redis import RedisServer
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


@pytest.fixture
def policed_front(front: Fronts) -> Secure:
    """The same policy on listeners in process, for refusals that the session alone decides."""
    return make_secure(front, POLICY, users={"billing": PASSWORD, "app": PASSWORD})


def billing(secure: Secure) -> smtplib.SMTP:
    client = secure.client(secure.submission, tls=True)
    client.login("billing", PASSWORD)
    return client


def message(sender: str = "Billing <billing@sender.test>", body: str = "hi") -> bytes:
    return f"From: {sender}\r\nTo: a@dest.test\r\nSubject: s\r\n\r\n{body}\r\n".encode()


@pytest.mark.parametrize("sender", ["other@sender.test", "billing@evil.test", "x@sender.test", "<>"])
def test_envelope_sender_outside_the_account_is_refused(policed_front: Secure, sender: str) -> None:
    policed = policed_front
    with billing(policed) as client:
        code, text = client.docmd(f"MAIL FROM:<{sender.strip('<>')}>")
        assert (code, text[:5]) == (553, b"5.7.1")
    assert policed.server.queued() == []


@pytest.mark.parametrize("sender", ["billing@sender.test", "anyone@billing.sender.test"])
def test_allowed_senders_pass(policed: Secure, sender: str) -> None:
    sink = policed.world.sink("dest")
    with billing(policed) as client:
        client.sendmail(sender, ["a@dest.test"], message())
    sink.wait_for_messages(1, timeout=20)


@pytest.mark.parametrize("header_from", ["Evil <ceo@evil.test>", "billing@sender.test, ceo@evil.test", ""])
def test_from_header_outside_the_account_is_refused_and_never_queued(policed_front: Secure, header_from: str) -> None:
    policed = policed_front
    with billing(policed) as client:
        client.mail("billing@sender.test")
        client.rcpt("a@dest.test")
        data = message(header_from) if header_from else b"Subject: no from\r\n\r\nbody\r\n"
        code, text = client.data(data)
        assert (code, text[:5]) == (553, b"5.7.1")
    assert policed.server.queued() == []


def test_account_size_and_recipient_limits(policed_front: Secure) -> None:
    policed = policed_front
    with billing(policed) as client:
        client.mail("billing@sender.test")
        assert client.rcpt("a@dest.test")[0] == 250
        assert client.rcpt("b@dest.test")[0] == 250
        assert client.rcpt("c@dest.test")[:1] == (452,)
        code, text = client.data(message(body="x" * 70 + "\r\n" * 1 + ("y" * 70 + "\r\n") * 40))
        assert (code, text[:5]) == (552, b"5.3.4")
    assert policed.server.queued() == []


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


def transaction(secure: Secure, user: str, start: threading.Barrier, finish: threading.Barrier,
                results: dict[int, tuple[Any, ...]], index: int) -> None:
    """MAIL and RCPT, then wait for every other client to have got as far, then DATA."""
    replies: tuple[Any, ...] = ()
    try:
        # From addresses of their own: logins in flight from one address count against it (AUTH throttle).
        with secure.client(secure.submission, tls=True, source=f"127.0.2.{index + 1}") as client:
            client.login(user, PASSWORD)
            start.wait(30)  # every client logged in: the MAILs come at once
            mail = client.docmd(f"MAIL FROM:<{user}@sender.test>")
            replies = (mail,)
            if mail[0] == 250:
                replies += (client.docmd(f"RCPT TO:<n{index}@dest.test>"),)
            finish.wait(30)  # nobody's DATA before every MAIL has been answered
            if mail[0] == 250:
                replies += (client.data(message(f"{user}@sender.test", body=f"message {index}")),)
    finally:
        results[index] = replies


def test_parallel_clients_of_one_account_get_exactly_its_message_rate(world: World) -> None:
    parallel, limit = 12, 4
    secure = make_secure(world, {"accounts": {"users": {"burst": {"messages_per_minute": limit}}},
                                 "queue": {"retry_initial": "1h", "retry_max": "2h"}}, users={"burst": PASSWORD})
    sink = world.sink("dest", ["-r", "RCPT"])  # 450: the accepted mail stays in the spool to be counted
    start, finish = threading.Barrier(parallel), threading.Barrier(parallel)
    results: dict[int, tuple[Any, ...]] = {}
    threads = [threading.Thread(target=transaction, args=(secure, "burst", start, finish, results, i))
               for i in range(parallel)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == parallel and not any(thread.is_alive() for thread in threads)

    accepted = [r for r in results.values() if len(r) == 3 and r[2][0] == 250]
    refused = [r for r in results.values() if len(r) == 1]
    assert len(accepted) == limit, results
    assert len(refused) == parallel - limit, results
    assert all(r[0][0] == 451 and r[0][1].startswith(b"4.7.1 Message rate limit") for r in refused)
    queued = secure.server.wait_for_queue(lambda q: len(q) == limit and all(i["attempts"] >= 1 for i in q),
                                          what="the accepted messages tried once")
    assert len(queued) == limit
    assert len(events(secure.server, "received")) == limit

    sink.restart([])
    assert secure.server.queue("flush").returncode == 0
    secure.server.wait_queue_empty(timeout=30)
    assert len(sink.wait_for_messages(limit, timeout=10)) == limit
    assert len(sink.messages()) == limit


def test_transactions_without_data_give_their_reservation_back(world: World) -> None:
    limit = 2
    secure = make_secure(world, {"accounts": {"users": {"burst": {"messages_per_minute": limit,
                                                                  "recipients_per_day": 2}}}},
                         users={"burst": PASSWORD})
    sink = world.sink("dest")

    def logged_in() -> smtplib.SMTP:
        client = secure.client(secure.submission, tls=True)
        client.login("burst", PASSWORD)
        return client

    # Two open transactions hold the whole rate: a third MAIL, in parallel, is refused.
    holders = [logged_in() for _ in range(limit)]
    for number, client in enumerate(holders):
        assert client.docmd("MAIL FROM:<burst@sender.test>")[0] == 250
        assert client.docmd(f"RCPT TO:<h{number}@dest.test>")[0] == 250
    other = logged_in()
    code, text = other.docmd("MAIL FROM:<burst@sender.test>")
    assert (code, text[:5]) == (451, b"4.7.1")
    code, text = holders[1].docmd("RCPT TO:<h9@dest.test>")  # two held of two a day: one more is too many
    assert (code, text[:5]) == (451, b"4.7.1")

    # RSET, QUIT and a dropped connection each give theirs back.
    assert holders[0].docmd("RSET")[0] == 250
    assert other.docmd("MAIL FROM:<burst@sender.test>")[0] == 250
    assert other.docmd("RSET")[0] == 250
    holders[1].quit()
    again = logged_in()
    assert again.docmd("MAIL FROM:<burst@sender.test>")[0] == 250
    assert again.docmd("RCPT TO:<x@dest.test>")[0] == 250
    again.close()  # gone without QUIT
    holders[0].quit()

    # The whole rate is free again: two transactions may be held at once (the
    # server notices the dropped connection as soon as it reads from it).
    first, second = logged_in(), logged_in()
    deadline = time.monotonic() + 10
    assert first.docmd("MAIL FROM:<burst@sender.test>")[0] == 250
    while (code := second.docmd("MAIL FROM:<burst@sender.test>")[0]) != 250 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert code == 250
    first.quit()
    second.rset()
    for number in range(limit):
        second.sendmail("burst@sender.test", [f"s{number}@dest.test"], message("burst@sender.test"))
    code, text = second.docmd("MAIL FROM:<burst@sender.test>")
    assert (code, text[:5]) == (451, b"4.7.1")
    second.quit()
    sink.wait_for_messages(limit, timeout=20)
    other.close()



def test_two_pods_sharing_the_limits_store_share_an_accounts_rates(world: World, redis: RedisServer) -> None:
    """An app whose submissions the Service spreads over the pods gets its rates once, not per pod."""
    users = {"billing": {"messages_per_minute": 3}, "bulk": {"recipients_per_day": 3}}
    pods = [make_secure(world, {"accounts": {"users": users}, "limits": {"store": limits_store(world, redis, name)}},
                        users={"billing": PASSWORD, "bulk": PASSWORD}, name=name) for name in ("a", "b")]

    def submit(secure: Secure, user: str, recipients: list[str]) -> list[tuple[int, bytes]]:
        with secure.client(secure.submission, tls=True) as client:
            client.login(user, PASSWORD)
            answers = [client.docmd(f"MAIL FROM:<{user}@sender.test>")]
            for rcpt in recipients:
                if answers[-1][0] == 250:
                    answers.append(client.docmd(f"RCPT TO:<{rcpt}>"))
            if answers[-1][0] == 250:
                answers.append(client.data(message(f"{user}@sender.test")))
            return answers

    first = [submit(pods[n % 2], "billing", ["a@dest.test"])[0] for n in range(5)]  # a, b, a, b, a
    assert [code for code, _ in first] == [250, 250, 250, 451, 451], first
    assert first[3][1].startswith(b"4.7.1 Message rate limit")
    assert [code for code, _ in submit(pods[0], "bulk", ["a@dest.test", "b@dest.test"])] == [250, 250, 250, 250]
    on_b = submit(pods[1], "bulk", ["c@dest.test", "d@dest.test"])  # the day's third fits, the fourth not
    assert [code for code, _ in on_b] == [250, 250, 451], on_b
