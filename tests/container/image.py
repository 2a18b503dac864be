"""Building and running the real Dockerfile with podman, as DESIGN.md describes.

Owns: the base image ``localhost/pybase`` (Debian bookworm with python3 made
by ``debootstrap`` and imported once per machine, guarded by a lock file so
parallel runs build it once), the test image ``localhost/kubemta:test``, and
containers named ``kubemta-test-*`` that a test starts (removed by name).

How it fails: ``missing_tools()`` names what this machine lacks (the tests
skip with it, or fail with it in CI); a failed build raises RuntimeError with podman's output.
"""

from __future__ import annotations

import fcntl
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BASE = "localhost/pybase"
IMAGE = "localhost/kubemta:test"
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager=cgroupfs"]
RUN_LIMITS = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096"]
CACHE = Path("/var/tmp/kubemta-pybase")


def missing_tools() -> list[str]:
    return [tool for tool in ("podman", "runc") if shutil.which(tool) is None]


def _run(argv: list[str], timeout: float, what: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done.stdout


def image_exists(name: str) -> bool:
    return subprocess.run([*PODMAN, "image", "exists", name], capture_output=True, timeout=60).returncode == 0


def ensure_base() -> None:
    """``localhost/pybase``: built with debootstrap once per machine."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if image_exists(BASE):
            return
        if shutil.which("debootstrap") is None:
            raise RuntimeError("debootstrap is needed to make the base image (apt-get install debootstrap)")
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            rootfs = Path(tmp) / "rootfs"
            _run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
                  "bookworm", str(rootfs)], 900, "debootstrap")
            tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
            try:
                done = subprocess.run([*PODMAN, "import", "-", BASE], stdin=tar.stdout, capture_output=True,
                                      text=True, timeout=600)
            finally:
                assert tar.stdout is not None
                tar.stdout.close()
                tar.wait(timeout=60)
            if done.returncode != 0:
                raise RuntimeError(f"podman import failed: {done.stderr}")


def build() -> None:
    """Build the repository's Dockerfile as ``localhost/kubemta:test`` (layers cached by podman)."""
    ensure_base()
    _run([*PODMAN, "build", "--build-arg", f"PYTHON_IMAGE={BASE}", "--network", "host", "--isolation", "chroot",
          "-v", "/etc/ssl/certs:/etc/ssl/certs:ro", "--env", "PIP_CERT=/etc/ssl/certs/ca-certificates.crt",
          "-t", IMAGE, str(ROOT)], 1200, "podman build")


def remove(name: str) -> None:
    subprocess.run([*PODMAN, "rm", "-f", "-t", "0", name], capture_output=True, timeout=120)
