"""Workload identity end to end: a real `mta serve`, real clients (smtplib, aiohttp), the fake Kubernetes API.

Tokens are real JWTs signed by the fake API server's issuer key; the
TokenReview, pod list/watch, namespace and JWKS answers are the API's JSON.

- SMTP AUTH with a token: a valid one gets its workload's sender binding and
  reaches the sink with its identity in Authentication-Results; an expired,
  wrong-audience or revoked token gets 535 5.7.8; a workload with no policy
  is refused at MAIL with 550 5.7.1; parallel logins with one token are one
  review; a revocation is seen once ``cache_ttl`` has passed; an API server
  that is down is 454 4.7.0, not a refusal.
- ``verify: jwks``: keys from an explicit URL (with the pod's bearer token)
  or by OIDC discovery from the issuer name; no TokenReview is made.
- HTTP API with ``Authorization: Bearer <token>``: 202 for the workload's
  own senders, 403 for others, 401 for a bad token.
- ``identify_pods``: a legacy client without AUTH is known by its pod through
  a live watch; a label change, a deleted pod and an address taken over by
  another pod apply while kubemta runs; until the first pod list arrives the
  answer is 451 4.7.0.
"""

from __future__ import annotations

import asyncio
import email
import json
import os
import re
import smtplib
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.conftest import World
from tests.fakes.kube_api import ISSUER, JWKS_PATH, FakeKubeApi
from tests.integration.test_http_api import api_mta, post, url
from tests.obs.logs import wait_for_event
from tests.obs.scrape import wait_for_sample
from tests.peers.net import free_port
from tests.peers.recorder import Recorder
from tests.security.conftest import Secure, make_secure

WORKLOADS = {"shop/orders": {"senders": ["@shop.example"]}}


def kubernetes(kube: FakeKubeApi) -> dict[str, Any]:
    kube.add_statefulset("mail", "mta", 1)
    return {"enabled": True, "api_url": kube.url, "namespace": "mail", "pod_name": "mta-0"}


def secure_with_tokens(world: World, kube: FakeKubeApi, **service_accounts: Any) -> Secure:
    return make_secure(world, {
        "kubernetes": kubernetes(kube),
        "service_accounts": {"enabled": True, "audience": "kubemta", **service_accounts},
        "accounts": {"workloads": WORKLOADS},
    })


def login_code(secure: Secure, token: str, source: str | None = None) -> tuple[int, bytes]:
    """smtplib tries PLAIN, then LOGIN: a bad token is two failures, counted against ``source``."""
    with secure.client(secure.submission, tls=True, source=source) as client:
        try:
            return client.login("serviceaccount", token)
        except smtplib.SMTPAuthenticationError as exc:
            return exc.smtp_code, exc.smtp_error


def eventually(probe: Callable[[], Any], wanted: Callable[[Any], bool], timeout: float = 15) -> Any:
    """``probe()`` until ``wanted`` holds of its result (bounded in time); the last result."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if wanted(result) or time.monotonic() > deadline:
            return result
        time.sleep(0.2)


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
        # The identity follows the message into its delivery events and a bounded metric label.
        [delivered] = wait_for_event(secure.server, "delivered", queue_id=received["queue_id"])
        assert (delivered["user"], delivered["namespace"]) == ("system:serviceaccount:shop:orders", "shop")
        wait_for_sample(secure.server, "kubemta_workload_messages_total", 1, namespace="shop")


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

        def login(n: int) -> int:
            # From addresses of their own: the AUTH gate bounds logins in flight per client address.
            with secure.client(secure.submission, tls=True, source=f"127.0.1.{n + 1}") as client:
                code, _text = client.login("serviceaccount", token)
                return code

        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(login, range(16)))
        assert codes == [235] * 16
        assert kube.reviews == 1


def test_a_revoked_token_is_refused_once_the_cache_ttl_has_passed(world: World) -> None:
    with FakeKubeApi() as kube:
        secure = secure_with_tokens(world, kube, cache_ttl="1s")
        token = kube.issue("shop", "orders")
        assert login_code(secure, token)[0] == 235
        kube.revoked.add(token)  # the pod was deleted: the API server refuses its bound token from now on
        started = time.monotonic()
        assert login_code(secure, token)[0] == 235 or time.monotonic() - started > 1  # still cached
        time.sleep(1.2)
        code, text = login_code(secure, token)
        assert (code, text[:5]) == (535, b"5.7.8")
        assert kube.reviews == 2


def test_an_api_server_that_is_down_is_a_temporary_error_not_a_refusal(world: World) -> None:
    with FakeKubeApi() as kube:
        secure = secure_with_tokens(world, kube)
        token = kube.issue("shop", "orders")
        kube.failing.add("tokenreviews")
        code, text = login_code(secure, token)
        assert (code, text[:5]) == (454, b"4.7.0")
        kube.stop()  # gone altogether: connection refused
        code, text = login_code(secure, token)
        assert (code, text[:5]) == (454, b"4.7.0")


@pytest.mark.parametrize("keys", ["jwks_url", "discovery"])
def test_jwks_checks_tokens_here_without_a_review(world: World, keys: str, tmp_path: Any) -> None:
    with FakeKubeApi(token="kubemta-pod-token") as kube:  # the key URL wants the pod's own token, as a cluster's does
        token_file = tmp_path / "token"
        token_file.write_text("kubemta-pod-token\n")
        settings: dict[str, Any] = {"verify": "jwks", "token_file": str(token_file)}
        if keys == "jwks_url":
            settings.update(issuer=ISSUER, jwks_url=kube.url + JWKS_PATH)
        else:
            kube.issuer = kube.url
            settings.update(issuer=kube.url)
        secure = make_secure(world, {"service_accounts": {"enabled": True, **settings},
                                     "accounts": {"workloads": WORKLOADS}})
        token = kube.issue("shop", "orders")
        kube.revoked.add(token)  # offline checks cannot see a revocation: valid until it expires (README)
        with secure.client(secure.submission, tls=True) as client:
            assert client.login("serviceaccount", token)[0] == 235
            assert client.mail("orders@shop.example")[0] == 250
        forged = FakeKubeApi()  # another issuer's key, the same kid and claims
        forged.issuer = kube.issuer
        bad = [kube.issue("shop", "orders", audience="vault"), kube.issue("shop", "orders", lifetime=-60),
               forged.issue("shop", "orders")]
        for n, token in enumerate(bad):  # each from its own address: the AUTH gate would lock out one that repeats
            code, text = login_code(secure, token, source=f"127.0.0.{41 + n}")
            assert (code, text[:5]) == (535, b"5.7.8")
        assert kube.reviews == 0
        assert ("GET", JWKS_PATH) in kube.requests


def test_the_http_api_takes_a_token_as_bearer(world: World) -> None:
    with FakeKubeApi() as kube, Recorder() as recorder:
        server, _keys = api_mta(world, recorder, {
            "kubernetes": kubernetes(kube), "service_accounts": {"enabled": True},
            "accounts": {"workloads": {"shop/orders": {"senders": ["@shop.example"],
                                                       "from_addresses": ["@shop.example"]}}}})
        token = kube.issue("shop", "orders", pod="orders-7c4d-x2x9z")
        message = {"from": "orders@shop.example", "to": ["alice@dest.test"], "subject": "order", "text": "ok\n"}
        status, answer = asyncio.run(post(url(server), "/v1/messages", token, body=message))
        assert status == 202, answer
        status, answer = asyncio.run(post(url(server), "/v1/messages", token,
                                          body={**message, "from": "someone@other.example"}))
        assert (status, answer["error"]["code"], answer["error"]["status"]) == (403, "sender_not_allowed", "5.7.1")
        status, answer = asyncio.run(post(url(server), "/v1/messages", kube.issue("shop", "orders", lifetime=-60),
                                          body=message))
        assert (status, answer["error"]["code"]) == (401, "unauthenticated")
        status, answer = asyncio.run(post(url(server), "/v1/messages", kube.issue("other", "batch"), body=message))
        assert (status, answer["error"]["code"], answer["error"]["status"]) == (403, "workload_not_allowed", "5.7.1")
        [received] = recorder.wait_for(1, timeout=30)
        assert received.mail_from == "orders@shop.example"
        [event] = wait_for_event(server, "received", namespace="shop")
        assert event["user"] == "system:serviceaccount:shop:orders"


POD_IP, OTHER_IP = "127.0.0.31", "127.0.0.32"


def test_a_legacy_client_is_known_by_its_pod_through_a_live_watch(world: World) -> None:
    sink = world.sink("dest")
    with FakeKubeApi() as kube:
        kube.namespaces["legacy"] = {"team": "crm"}
        kube.add_pod("legacy", "crm-0", POD_IP, "crm", {"mail": "allowed"})
        kube.failing.add("pods")  # the API server is not answering yet when kubemta starts
        server = world.mta({
            "listeners": [{"name": "apps", "address": "127.0.0.1:{port}", "mode": "relay", "identify_pods": True}],
            "kubernetes": kubernetes(kube),
            "accounts": {"workload_selectors": [{"namespace_labels": {"team": "crm"}, "pod_labels": {"mail": "allowed"},
                                                 "policy": {"senders": ["@crm.example"]}}]},
        })

        def mail_from(ip: str, sender: str = "crm@crm.example") -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", server.port, timeout=15, source_address=(ip, 0)) as client:
                client.ehlo("crm.legacy.test")
                return client.mail(sender)

        code, text = mail_from(POD_IP)
        assert (code, text[:5]) == (451, b"4.7.0")  # not "no such pod": the list has not arrived
        kube.failing.clear()
        assert eventually(lambda: mail_from(POD_IP)[0], lambda code: code == 250) == 250
        assert mail_from(POD_IP, "crm@elsewhere.example")[0] == 553  # the selector's sender binding

        with smtplib.SMTP("127.0.0.1", server.port, timeout=15, source_address=(POD_IP, 0)) as client:
            client.sendmail("crm@crm.example", ["user@dest.test"], b"From: crm@crm.example\r\nSubject: x\r\n\r\nhi\r\n")
        [message] = sink.wait_for_messages(1, timeout=20)
        results = " ".join(email.message_from_bytes(message.data)["Authentication-Results"].split())
        assert results == ('mta.kubemta.test; x-kubernetes-pod=pass '
                           'policy.serviceaccount="system:serviceaccount:legacy:crm" policy.pod="legacy/crm-0"')
        assert b"smtp.auth" not in message.data  # no SMTP AUTH took place
        [received] = wait_for_event(server, "received", namespace="legacy")
        assert received["user"] == "system:serviceaccount:legacy:crm"

        with smtplib.SMTP("127.0.0.1", server.port, timeout=15, source_address=(OTHER_IP, 0)) as client:
            client.ehlo("stranger.test")
            client.mail("crm@crm.example")
            code, text = client.rcpt("user@dest.test")
        assert (code, text[:5]) == (554, b"5.7.1")  # no pod has this address: no relay, whatever its network

        kube.label_pod("legacy", "crm-0", {"mail": "denied"})  # seen through the watch, no restart
        code, text = eventually(lambda: mail_from(POD_IP), lambda answer: answer[0] == 550)
        assert (code, text[:5]) == (550, b"5.7.1") and b"system:serviceaccount:legacy:crm" in text

        kube.delete_pod("legacy", "crm-0")
        kube.namespaces["batch"] = {}
        kube.add_pod("batch", "job-0", POD_IP, "runner")  # the address given to another workload's pod
        code, text = eventually(lambda: mail_from(POD_IP), lambda answer: b"batch:runner" in answer[1])
        assert (code, text[:5]) == (550, b"5.7.1") and b"system:serviceaccount:batch:runner" in text
        assert kube.watches >= 1


def test_tokens_alone_need_no_password_file_and_no_key_file(world: World) -> None:
    """With service_accounts on, ``auth`` and ``http_api`` may leave out their files: no shared secret at all."""
    with FakeKubeApi() as kube, Recorder() as recorder:
        secure = make_secure(world, {"kubernetes": kubernetes(kube), "service_accounts": {"enabled": True},
                                     "accounts": {"workloads": WORKLOADS}})
        secure.server.stop()
        api_port = free_port()
        config = secure.server.config
        for listener in config["listeners"]:
            listener.get("auth", {}).pop("credentials_file", None)
        config["http_api"] = {"address": f"127.0.0.1:{api_port}"}
        config["routes"] = [{"domains": ["*"], "relay": f"127.0.0.1:{recorder.port}", "tls": "none"}]
        secure.server.config_path.write_text(json.dumps(config))
        secure.server.start()
        token = kube.issue("shop", "orders")
        assert login_code(secure, token)[0] == 235
        code, text = login_code(secure, "correct horse battery", source="127.0.0.51")  # a password: nothing to check
        assert (code, text[:5]) == (535, b"5.7.8")
        body = {"from": "orders@shop.example", "to": ["alice@dest.test"], "subject": "s", "text": "t\n"}
        base = f"http://127.0.0.1:{api_port}"
        status, answer = asyncio.run(post(base, "/v1/messages", token, body=body))
        assert status == 202, answer
        status, answer = asyncio.run(post(base, "/v1/messages", "billing.not-a-key", body=body))
        assert (status, answer["error"]["code"]) == (401, "unauthenticated")
        assert len(recorder.wait_for(1, timeout=30)) == 1


def test_the_readme_token_example_works_as_written(world: World) -> None:
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text.split("<!-- token-example -->")[1].split("<!-- /token-example -->")[0]
    [command] = re.findall(r"```sh\n(.*?)```", section, re.S)
    ca = trustme.CA()
    directory = world.root / "token-example"
    directory.mkdir()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_pem.write_to_path(str(directory / "tls.key"))
    cert.cert_chain_pems[0].write_to_path(str(directory / "tls.crt"))
    ca.cert_pem.write_to_path(str(directory / "ca.crt"))
    with FakeKubeApi() as kube, Recorder() as recorder:
        server, _keys = api_mta(world, recorder, {
            "kubernetes": kubernetes(kube), "service_accounts": {"enabled": True},
            "accounts": {"workloads": WORKLOADS}},
            tls={"cert_file": str(directory / "tls.crt"), "key_file": str(directory / "tls.key")})
        token_file = directory / "token"  # where the pod's projected volume puts it
        token_file.write_text(kube.issue("shop", "orders"))
        done = subprocess.run(["bash", "-euo", "pipefail", "-c",
                               command.replace("/var/run/secrets/kubemta/token", str(token_file))],
                              cwd=directory, env={**os.environ, "MTA_API": url(server)},
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (done.stdout, done.stderr)
        assert json.loads(done.stdout)["id"]
        [received] = recorder.wait_for(1, timeout=30)
    assert received.mail_from == "orders@shop.example" and received.rcpt_tos == ["alice@example.org"]
