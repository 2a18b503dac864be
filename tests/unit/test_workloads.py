"""Workload policy precedence, the token cache's bounds and expiry, and the pod map's updates."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from mta.auth.workload import REFUSED_TTL, TokenRefused, TokenUnchecked, Verified, WorkloadTokens
from mta.config import AccountsConfig
from mta.k8s.pods import PodDirectory
from mta.policy.workloads import Workload, policy_for

ACCOUNTS = AccountsConfig(
    workloads={"shop/orders": {"senders": ["@orders.example"]}, "shop/*": {"senders": ["@shop.example"]}},
    workload_selectors=[{"namespace_labels": {"team": "pay"}, "policy": {"senders": ["@pay.example"]}},
                        {"pod_labels": {"mail": "yes"}, "policy": {"senders": ["@pods.example"]}}])


@pytest.mark.parametrize(("workload", "labels", "senders"), [
    (Workload("shop", "orders"), {}, ["@orders.example"]),
    (Workload("shop", "web"), {"team": "pay"}, ["@shop.example"]),  # a name beats a selector
    (Workload("billing", "api"), {"team": "pay"}, ["@pay.example"]),
    (Workload("misc", "job", "p", {"mail": "yes"}), {}, ["@pods.example"]),
    (Workload("misc", "job"), {"team": "other"}, None),  # no entry, no default: may not send
])
def test_policy_precedence_and_deny_by_default(workload: Workload, labels: dict[str, str],
                                               senders: list[str] | None) -> None:
    policy = policy_for(ACCOUNTS, workload, labels)
    assert (policy.senders if policy is not None else None) == senders


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


class Check:
    def __init__(self, expires: float) -> None:
        self.expires, self.calls = expires, 0

    def check(self, token: str) -> Verified:
        self.calls += 1
        if token == "bad":
            raise TokenRefused("no")
        return Verified(Workload("shop", token), self.expires)


def test_a_token_is_cached_until_it_expires_at_most_the_ttl_and_the_cache_is_bounded() -> None:
    clock, check = Clock(), Check(expires=1100.0)
    tokens = WorkloadTokens(check, cache_ttl=300, cache_size=2, clock=clock)

    async def main() -> None:
        assert (await tokens.verify("a")).service_account == "a"
        await tokens.verify("a")
        assert check.calls == 1
        clock.now = 1101.0  # the token's own expiry, before the ttl
        with pytest.raises(TokenRefused):
            await tokens.verify("a")  # checked again: it is expired now
        check.expires = 5000.0
        await tokens.verify("b")
        clock.now += 301  # past the ttl
        await tokens.verify("b")
        assert check.calls == 4
        await tokens.verify("c")
        await tokens.verify("d")  # "b" is the least recently used of three: forgotten
        calls = check.calls
        await tokens.verify("b")
        assert check.calls == calls + 1
        with pytest.raises(TokenRefused):
            await tokens.verify("bad")
        calls = check.calls
        with pytest.raises(TokenRefused):
            await tokens.verify("bad")  # the refusal is remembered: no second check
        assert check.calls == calls
        clock.now += REFUSED_TTL + 1
        with pytest.raises(TokenRefused):
            await tokens.verify("bad")
        assert check.calls == calls + 1

    asyncio.run(main())


def test_a_token_that_could_not_be_checked_is_not_remembered() -> None:
    class Unreachable:
        calls = 0

        def check(self, token: str) -> Verified:
            self.calls += 1
            raise TokenUnchecked("connection refused")

    check = Unreachable()
    tokens = WorkloadTokens(check, cache_ttl=300, cache_size=8, clock=Clock())

    async def main() -> None:
        for _ in range(2):
            with pytest.raises(TokenUnchecked):
                await tokens.verify("a")

    asyncio.run(main())
    assert check.calls == 2


def pod(uid: str, ip: str | None, labels: dict[str, str], phase: str = "Running", account: str = "orders") -> Any:
    return SimpleNamespace(
        metadata=SimpleNamespace(uid=uid, name=f"pod-{uid}", namespace="shop", labels=labels, deletion_timestamp=None),
        spec=SimpleNamespace(service_account_name=account),
        status=SimpleNamespace(phase=phase, pod_ip=ip, pod_ips=[SimpleNamespace(ip=ip)] if ip else []))


def test_the_pod_map_follows_label_changes_ip_reuse_and_finished_pods() -> None:
    directory = PodDirectory(SimpleNamespace(), [])  # type: ignore[arg-type]
    directory._replace(None, [pod("1", "10.0.0.5", {"mail": "yes"})])
    found = directory.lookup("10.0.0.5")
    assert found is not None and found.pod_labels == {"mail": "yes"}
    directory._apply("MODIFIED", pod("1", "10.0.0.5", {"mail": "no"}))
    found = directory.lookup("10.0.0.5")
    assert found is not None and found.pod_labels == {"mail": "no"}
    directory._apply("MODIFIED", pod("1", "10.0.0.5", {}, phase="Succeeded"))
    assert directory.lookup("10.0.0.5") is None  # its address may be another pod's next
    directory._apply("ADDED", pod("2", "10.0.0.5", {}, account="batch"))
    directory._apply("DELETED", pod("1", "10.0.0.5", {}))  # the old pod's delete does not drop the new one
    found = directory.lookup("10.0.0.5")
    assert found is not None and found.service_account == "batch"
    directory._replace(None, [])
    assert directory.lookup("10.0.0.5") is None and len(directory) == 0
