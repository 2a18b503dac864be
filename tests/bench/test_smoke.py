"""The benchmark in smoke mode: it runs, and every system delivers every message it accepted.

Not a timed test: the numbers it prints are not checked, only that the
benchmark works end to end and writes its results."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts Postfix, OpenDKIM and kubemta and drives each for a while


@pytest.mark.skipif(shutil.which("opendkim") is None and not Path("/usr/sbin/opendkim").exists(),
                    reason="the benchmark compares with Postfix + OpenDKIM: install opendkim")
def test_benchmark_smoke_run(tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, "-m", "bench.run", "--smoke", "--out", str(out)],
                          cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((out / "results.json").read_text())
    systems = {run["system"] for run in results["runs"]}
    assert systems == {"kubemta", "kubemta-dkim", "postfix", "postfix-opendkim"}
    assert all(run["all_delivered"] and run["delivered"] == run["messages"] for run in results["runs"])
    assert {row["system"] for row in results["latency"]} == systems
    assert (out / "results.md").read_text().startswith("# kubemta vs Postfix")
    assert (out / "throughput.png").stat().st_size > 1000
