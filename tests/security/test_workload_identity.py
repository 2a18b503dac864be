"""SMTP AUTH with a ServiceAccount token: a real `mta serve`, a real smtplib client, the fake API's TokenReview.

Tokens are real JWTs signed by the fake API server's issuer key; the
TokenReview answers are the API's JSON.  Cases: a valid token gets its
workload's sender binding and reaches the sink with its identity in
Authentication-Results; an expired, wrong-audience or revoked token gets
535 5.7.8; a workload with no policy is refused at MAIL with 550 5.7.1;
parallel logins with one token are one review.
"""

from __future__ import annotations

import smtplib
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import World
from tests.fakes.kube_api import FakeKubeApi
from tests.obs.logs import wait_for_event
from tests.security.conftest import Secure, make_secure

WORKLOADS = {"shop/orders": {"senders": ["@shop.example"]}}


def secure_with_tokens(world: World, kube: FakeKubeApi) -> Secure:
    kube.add_statefulset("mail", "mta", 1)
    return make_secure(world, {
        "kubernetes": {"enabled": True, "api_url": kube.url, "namespace": "mail", "pod_name": "mta-0"},
        "service_accounts": {"enabled": True, "audience": "kubemta"},
        "accounts": {"workloads": WORKLOADS},
    })


def test_a_valid_token_authenticates_the_workload_and_its_sender_binding_applies(world: World) -> None:
    sink = world.sink("dest")
    with FakeKubeApi() as kube:
        secure = secure_with_tokens(world, kube)
        token = kube.issue("shop", "orders", pod="orders-5d9f-abcde")
        with secure.client(secure.submission, tls=True) as client:
            client.login("serviceaccount", token)
            with pytest.raises(smtplib.SMTPSenderRefused) as refused:
                client.sendmail("app@other.example", ["user@dest.test"], b"Subject: x\r\n\r\nbody\r\n")
            assert refused.value.smtp_code == 553
            client.sendmail("orders@shop.example", ["user@dest.test"],
                            b"From: orders@shop.example\r\nSubject: order\r\n\r\nbody\r\n")
        [message] = sink.wait_for_messages(1, timeout=20)
        assert b'auth=pass smtp.auth="system:serviceaccount:shop:orders"' in message.data
        assert token.encode() not in secure.server.log().encode()
        [received] = wait_for_event(secure.server, "received", namespace="shop")
        assert received["user"] == "system:serviceaccount:shop:orders"


@pytest.mark.parametrize("case", ["expired", "audience", "revoked", "garbage"])
def test_a_bad_token_is_535(world: World, case: str) -> None:
    with FakeKubeApi() as kube:
        secure = secure_with_tokens(world, kube)
        token = {"expired": lambda: kube.issue("shop", "orders", lifetime=-60),
                 "audience": lambda: kube.issue("shop", "orders", audience="vault"),
                 "revoked": lambda: kube.issue("shop", "orders"),
                 "garbage": lambda: "eyJhbGciOiJSUzI1NiJ9.e30.c2lnbmF0dXJl"}[case]()
        if case == "revoked":
            kube.revoked.add(token)
        with secure.client(secure.submission, tls=True) as client, \
                pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            client.login("serviceaccount", token)
        assert refused.value.smtp_code == 535 and refused.value.smtp_error.startswith(b"5.7.8")


def test_a_workload_without_policy_is_refused_at_mail(world: World) -> None:
    with FakeKubeApi() as kube:
        secure = secure_with_tokens(world, kube)
        token = kube.issue("other", "batch")
        with secure.client(secure.submission, tls=True) as client:
            client.login("serviceaccount", token)
            code, text = client.mail("batch@other.example")
        assert code == 550 and text.startswith(b"5.7.1 system:serviceaccount:other:batch may not send mail")


def test_parallel_logins_with_one_token_are_one_review(world: World) -> None:
    with FakeKubeApi() as kube:
        secure = secure_with_tokens(world, kube)
        token = kube.issue("shop", "orders")

        def login(_: int) -> int:
            with secure.client(secure.submission, tls=True) as client:
                code, _text = client.login("serviceaccount", token)
                return code

        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(login, range(16)))
        assert codes == [235] * 16
        assert kube.reviews == 1
