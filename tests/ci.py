"""A skip in CI is a failure: the one place that decides.

Locally a test may skip when this machine lacks something it needs (root,
network namespaces, a peer program, a free port, a download), with the
reason.  In CI (``CI=true``, as ``.ci/run`` is run there) the machine is
meant to have everything, so a skip would only hide a test that did not
run: ``require`` fails instead of skipping, and the report hooks below turn
every other skip of a test (``pytest.skip``, ``skipif``, a skip marker
added at collection, a fixture that skips) and every ``xfail`` into a
failure that names the reason.  A whole module skipped at collection
(``importorskip``) stays a skip, so the rest of the run goes on, and then
fails the run, listed with its reason under the summary.  ``tests/conftest.py`` installs the hooks for the whole suite.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest

PREFIX = "CI=true: a skip is a failure here"


def in_ci() -> bool:
    """True when the tests run in CI (``CI`` set to true, 1 or yes)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require(condition: bool, reason: str) -> None:
    """Go on when ``condition`` holds; otherwise skip locally, or fail in CI, naming ``reason``."""
    if condition:
        return
    if in_ci():
        pytest.fail(f"{PREFIX}: {reason}", pytrace=False)
    pytest.skip(reason)


def _reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    wasxfail = getattr(report, "wasxfail", None)
    if wasxfail is not None:
        return f"xfail ({wasxfail or 'no reason given'})"
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _as_failure(report: pytest.TestReport) -> None:
    if not in_ci():
        return
    if report.skipped or hasattr(report, "wasxfail"):
        report.longrepr = f"{PREFIX}: {_reason(report)}"
        report.outcome = "failed"
        if hasattr(report, "wasxfail"):
            del report.wasxfail  # otherwise reported as an xfail or xpass again


# tryfirst: the outermost wrapper, so it sees the report after the skipping plugin made it a skip or xfail.
@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    _as_failure(outcome.get_result())


def _left_skipped(reporter: Any) -> list[pytest.TestReport | pytest.CollectReport]:
    stats = getattr(reporter, "stats", {})
    return [report for kind in ("skipped", "xfailed", "xpassed") for report in stats.get(kind, [])]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A module skipped at collection (``importorskip``) lets the rest run, then fails the run."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if in_ci() and exitstatus == pytest.ExitCode.OK and _left_skipped(reporter):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    reports = _left_skipped(terminalreporter) if in_ci() else []
    if reports:
        terminalreporter.write_sep("=", PREFIX, red=True)
        for report in reports:
            terminalreporter.write_line(f"{report.nodeid or report.fspath}: {_reason(report)}")
