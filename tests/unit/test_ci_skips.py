"""``tests.ci``: with ``CI=true`` every kind of skip and xfail fails, naming its reason; without it they skip.

Each case runs a real pytest in a subprocess, on a folder of its own with
the plugin loaded (``-p tests.ci``), so nothing of this suite's own
configuration takes part.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CASES = '''
import pytest

from tests.ci import require


def test_passes():
    pass


def test_imperative_skip():
    pytest.skip("no frobnicator on this machine")


@pytest.mark.skipif(True, reason="the widget is not installed")
def test_skipif():
    pass


def test_require():
    require(False, "needs the gizmo (apt-get install gizmo)")


def test_require_met():
    require(True, "never shown")


@pytest.mark.xfail(reason="a known bug")
def test_xfail():
    assert False


@pytest.mark.xfail(reason="fixed meanwhile")
def test_xpass():
    pass


@pytest.fixture
def peer():
    pytest.skip("the peer cannot start here")


def test_skip_in_a_fixture(peer):
    pass
'''

MODULE_SKIP = '''
import pytest

pytest.importorskip("kubemta_no_such_module")


def test_never_collected():
    pass
'''

TEST_REASONS = ["no frobnicator on this machine", "the widget is not installed",
                "needs the gizmo (apt-get install gizmo)", "a known bug", "fixed meanwhile",
                "the peer cannot start here"]
MODULE_REASON = "kubemta_no_such_module"


def run_pytest(folder: Path, ci: str | None) -> tuple[int, str]:
    (folder / "pytest.ini").write_text("[pytest]\n")
    (folder / "test_cases.py").write_text(CASES)
    (folder / "test_module_skip.py").write_text(MODULE_SKIP)
    env = {key: value for key, value in os.environ.items() if key not in ("CI", "PYTEST_ADDOPTS")}
    if ci is not None:
        env["CI"] = ci
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.ci", "-p", "no:cacheprovider", "-rA",
                           "-c", str(folder / "pytest.ini"), "--rootdir", str(folder), str(folder)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout + done.stderr


def summary(output: str) -> dict[str, int]:
    """The counts of pytest's last line: ``2 failed, 2 passed, 1 error in 0.1s`` -> {'failed': 2, ...}."""
    last = output.strip().splitlines()[-1]
    return {word.removesuffix("s") if word.startswith("error") else word: int(n)
            for n, word in re.findall(r"(\d+) (failed|passed|skipped|xfailed|xpassed|errors?)", last)}


@pytest.mark.parametrize("value", ["true", "1", "TRUE"])
def test_in_ci_every_skip_and_xfail_fails_with_its_reason(tmp_path: Path, value: str) -> None:
    code, output = run_pytest(tmp_path, value)
    assert code == 1, output
    counts = summary(output)
    assert counts.get("passed") == 2, output
    assert "xfailed" not in counts and "xpassed" not in counts, output
    # Every test that would skip or xfail fails, in its call or its setup (those count as errors) ...
    assert counts.get("failed", 0) + counts.get("error", 0) == 6, output
    # ... and the module skipped at collection, the one skip left, fails the run once the rest has run.
    assert counts.get("skipped") == 1, output
    for reason in TEST_REASONS:
        assert re.search(r"CI=true: a skip is a failure here: .*" + re.escape(reason), output), (reason, output)
    listed = output.split("= CI=true: a skip is a failure here =")[-1]
    assert "test_module_skip.py" in listed and MODULE_REASON in listed, output
    assert "never shown" not in output


@pytest.mark.parametrize("value", [None, "", "false"])
def test_outside_ci_they_skip_with_the_reason(tmp_path: Path, value: str | None) -> None:
    code, output = run_pytest(tmp_path, value)
    assert code == 0, output
    assert summary(output) == {"passed": 2, "skipped": 5, "xfailed": 1, "xpassed": 1}, output
    assert "a skip is a failure" not in output
    for reason in [*TEST_REASONS, MODULE_REASON]:
        assert reason in output, (reason, output)
