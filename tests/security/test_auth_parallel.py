"""AUTH brute force in parallel: the throttle holds, and the real user keeps their logins.

Sixty guesses at once from one address against a real ``mta serve``: at
most ``limits.max_auth_failures`` of them reach the password check, the rest
are refused before it; and the user whose name was guessed still logs in
from a client address that has not failed.
"""

from __future__ import annotations

import smtplib
from concurrent.futures import ThreadPoolExecutor

from tests.conftest import World, limits_store
from tests.peers.redis import RedisServer
from tests.security.conftest import PASSWORD, Secure, make_secure

GUESSES = 60


def guess(secure: Secure, password: str, source: str = "127.0.0.1") -> str:
    try:
        with smtplib.SMTP("127.0.0.1", secure.legacy, timeout=30, source_address=(source, 0)) as client:
            client.ehlo("app.kubemta.test")
            # One mechanism only: login() would try LOGIN after a failed PLAIN.
            client.user, client.password = "app", password
            code, _ = client.auth("PLAIN", client.auth_plain)
            return str(code)
    except smtplib.SMTPAuthenticationError as exc:
        return str(exc.smtp_code)
    except smtplib.SMTPServerDisconnected:
        return "closed"  # 421: this client is locked out
    except smtplib.SMTPResponseException as exc:
        return str(exc.smtp_code)


def test_parallel_guesses_get_at_most_the_budget_of_checks(secure: Secure) -> None:
    with ThreadPoolExecutor(max_workers=GUESSES) as pool:
        answers = list(pool.map(lambda n: guess(secure, f"wrong-{n}"), range(GUESSES)))
    checked = answers.count("535")
    assert 1 <= checked <= 5, sorted(answers)  # limits.max_auth_failures: 5
    assert set(answers) <= {"535", "421", "closed", "454"}, answers
    failures = secure.server.log().count('"event":"auth_failed"')
    assert failures == checked, "every answered guess was a real check, and no others ran"
    # The guessed user is locked for the address that failed, not for a clean one.
    assert guess(secure, PASSWORD, source="127.0.0.1") in ("421", "closed", "454")
    assert guess(secure, PASSWORD, source="127.0.0.2") == "235"


def test_two_pods_sharing_the_limits_store_share_one_failure_budget(world: World, redis: RedisServer) -> None:
    """A guesser that spreads over the pods behind a Service gets one budget, not one per pod."""
    pods = [make_secure(world, {"limits": {"store": limits_store(world, redis, name)}}, name=name)
            for name in ("a", "b")]
    answers = [guess(pods[n % 2], f"wrong-{n}") for n in range(12)]  # one after another, a, b, a, ...
    assert answers[:5] == ["535"] * 5, answers  # limits.max_auth_failures: 5, counted once for both
    assert set(answers[5:]) <= {"421", "closed"}, answers
    for secure in pods:
        assert guess(secure, PASSWORD, source="127.0.0.1") in ("421", "closed")
        assert guess(secure, PASSWORD, source="127.0.0.2") == "235"  # the user is not locked out of a clean address
    # In parallel, each pod counts its own attempts in flight: at most the budget per pod.
    with ThreadPoolExecutor(max_workers=GUESSES) as pool:
        burst = list(pool.map(lambda n: guess(pods[n % 2], f"wrong-{n}", source="127.0.0.3"), range(GUESSES)))
    assert 1 <= burst.count("535") <= 2 * 5, sorted(burst)
    assert guess(pods[0], PASSWORD, source="127.0.0.3") in ("421", "closed")
    assert guess(pods[1], PASSWORD, source="127.0.0.3") in ("421", "closed")
