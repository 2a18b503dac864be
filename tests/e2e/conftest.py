"""Fixtures of the end-to-end suite: one small internet per test run.

Every test here is marked ``slow`` (``-m "not slow"`` leaves the suite out).
The whole suite is skipped, with the reason, when network namespaces cannot
be made here (not root, no ``ip netns``) or a peer program is missing; in
CI (``CI=true``) each of its tests fails with that reason instead
(``tests.ci``).
``internet`` builds the world once per run and always tears it down
(processes by PID, then every ``kmta-*`` namespace it made), even when the
build itself fails half way.  ``world`` hands it to a test, after making
sure both pods run and the DNS holds its normal data; when the test fails,
the log lines each host wrote during the test are printed under "hosts".
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e import netns
from tests.e2e.world import PEER_BASE, World

NEEDED = ("postfix", "smtp-sink", "swaks", "knotd", "knotc", "perl")


def _why_not() -> str | None:
    reason = netns.available()
    if reason:
        return reason
    missing = [name for name in NEEDED if shutil.which(name) is None]
    if missing:
        return f"missing programs for the e2e suite: {', '.join(missing)} (see .ci/run)"
    return None


# tryfirst: the "slow" marker must be there before ``-m`` deselects.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    ours = [item for item in items if here in Path(str(item.fspath)).parents]
    if not ours:
        return
    for item in ours:
        item.add_marker(pytest.mark.slow)
    reason = _why_not()
    if reason:
        for item in ours:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def internet() -> Iterator[World]:
    PEER_BASE.mkdir(mode=0o755, exist_ok=True)
    PEER_BASE.chmod(0o755)
    root = PEER_BASE / f"e2e-{uuid.uuid4().hex[:8]}"
    root.mkdir(mode=0o755)
    world = World(root)
    try:
        world.build()
        yield world
    finally:
        errors = world.close()
        shutil.rmtree(root, ignore_errors=True)
        if errors:
            raise RuntimeError("e2e teardown: " + "; ".join(errors))


@pytest.fixture
def world(internet: World) -> World:
    internet.ensure_pods()
    internet.restore_dns()
    internet.mark()
    return internet


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    world = getattr(item, "funcargs", {}).get("world")
    if report.when == "call" and report.failed and isinstance(world, World):
        try:
            text = world.report()
        except Exception as exc:  # noqa: BLE001 -- a report must never hide the failure
            text = f"(could not collect the hosts' logs: {exc})"
        report.sections.append(("hosts: who said what", text))
