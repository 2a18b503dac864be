"""``AuthGate.unlock``: what an unlock clears, and the bound on what the gate remembers for it."""

from __future__ import annotations

import asyncio

from mta.auth import gate as gate_module
from mta.auth.gate import AuthGate
from mta.auth.throttle import Throttle


def run(coroutine: object) -> object:
    return asyncio.run(coroutine)  # type: ignore[arg-type]


def locked_gate() -> AuthGate:
    gate = AuthGate(Throttle(max_failures=3, window=600.0), threads=1)
    for address in ("192.0.2.1", "192.0.2.2"):
        for _ in range(3):
            run(gate.failed("app", address))
    return gate


def test_unlock_of_the_user_clears_it_and_the_addresses_that_failed_as_it() -> None:
    gate = locked_gate()
    run(gate.failed("other", "192.0.2.3"))
    assert run(gate.user_locked("app", "192.0.2.1")) and run(gate.client_locked("192.0.2.2"))
    result = run(gate.unlock("app"))
    assert result == {"user": "app", "user_locked": True, "addresses": ["192.0.2.1", "192.0.2.2"]}
    assert not run(gate.user_locked("app", "192.0.2.1")) and not run(gate.client_locked("192.0.2.2"))
    assert run(gate.throttle.failures("ip:192.0.2.3")) == 1  # another user's guesser is left alone
    assert run(gate.unlock("app"))["addresses"] == []
    gate.close()


def test_unlock_of_one_address_leaves_the_others_locked() -> None:
    gate = locked_gate()
    assert run(gate.unlock("app", "192.0.2.1"))["addresses"] == ["192.0.2.1"]
    assert not run(gate.user_locked("app", "192.0.2.1")) and not run(gate.client_locked("192.0.2.1"))
    assert run(gate.user_locked("app", "192.0.2.2")) and run(gate.client_locked("192.0.2.2"))
    assert run(gate.unlock("app"))["addresses"] == ["192.0.2.2"]
    gate.close()


def test_the_addresses_remembered_for_unlock_are_bounded() -> None:
    gate = AuthGate(Throttle(max_failures=3, window=600.0), threads=1)
    for n in range(gate_module.UNLOCK_ADDRESSES + 50):
        run(gate.failed("app", f"10.0.{n // 256}.{n % 256}"))
    assert len(gate._failed_from["app"]) == gate_module.UNLOCK_ADDRESSES
    for n in range(gate_module.UNLOCK_USERS + 10):
        run(gate.failed(f"user{n}", "192.0.2.9"))
    assert len(gate._failed_from) == gate_module.UNLOCK_USERS
    gate.close()


def test_the_control_socket_refuses_unlock_without_auth_or_with_a_bad_request() -> None:
    import asyncio
    from typing import Any

    from mta import control

    operator: Any = None  # unlock never reaches the queue
    no_auth = asyncio.run(control.handle(operator, {"action": "unlock", "ids": ["app"]}))
    assert no_auth == {"ok": False, "error": "this server has no AUTH listener: nothing to unlock"}
    gate = locked_gate()
    two = asyncio.run(control.handle(operator, {"action": "unlock", "ids": ["app", "b"]}, gate=gate))
    bad_ip = asyncio.run(control.handle(operator, {"action": "unlock", "ids": ["app"], "ip": 7}, gate=gate))
    assert not two["ok"] and not bad_ip["ok"]
    done = asyncio.run(control.handle(operator, {"action": "unlock", "ids": ["app"], "ip": "192.0.2.2"}, gate=gate))
    assert done == {"ok": True, "result": {"user": "app", "user_locked": True, "addresses": ["192.0.2.2"]}}
    gate.close()
