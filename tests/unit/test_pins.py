"""setup.cfg's ranges and constraints.txt's exact versions agree.

CI and the image install with ``-c constraints.txt``; ``pip install .``
without it takes any version inside setup.cfg's ranges.  Every requirement
(install_requires and the ``test`` extra) must therefore be pinned exactly
in constraints.txt, to a version its range allows, and the packages whose
private parts the code uses must have an upper bound.
"""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
PRIVATE_PARTS_USED = ("aiosmtpd", "aiosmtplib", "dkimpy")


def setup_cfg() -> configparser.ConfigParser:
    # setuptools reads setup.cfg with configparser too: whole-line comments inside a value are dropped.
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(ROOT / "setup.cfg")
    return parser


def requirements(option: str, section: str = "options") -> list[Requirement]:
    lines = setup_cfg()[section][option].splitlines()
    return [Requirement(line.strip()) for line in lines if line.strip()]


def constraints() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for number, raw in enumerate((ROOT / "constraints.txt").read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and name.strip() and version.strip(), f"constraints.txt:{number}: not an exact pin: {raw!r}"
        key = canonicalize_name(name.strip())
        assert key not in pins, f"constraints.txt:{number}: {name} is pinned twice"
        pins[key] = Version(version.strip())
    return pins


def test_constraints_are_exact_pins() -> None:
    assert len(constraints()) > 10


@pytest.mark.parametrize("option,section", [("install_requires", "options"), ("test", "options.extras_require")])
def test_every_requirement_is_pinned_inside_its_range(option: str, section: str) -> None:
    pins = constraints()
    wanted = requirements(option, section)
    assert wanted, f"no {option} in setup.cfg"
    for requirement in wanted:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is not pinned in constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {requirement.name}=={pins[name]}, outside setup.cfg's {requirement}")


def test_packages_whose_private_parts_are_used_have_an_upper_bound() -> None:
    by_name = {canonicalize_name(r.name): r for r in requirements("install_requires")}
    for name in PRIVATE_PARTS_USED:
        requirement = by_name[canonicalize_name(name)]
        uppers = [spec for spec in requirement.specifier if spec.operator in ("<", "<=", "==", "~=")]
        assert uppers, f"setup.cfg: {requirement} has no upper bound, though the code uses its private parts"


def test_the_image_build_installs_the_pinned_versions() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    copies = [line for line in dockerfile.splitlines() if line.startswith("COPY ") and "--from" not in line]
    assert any("constraints.txt" in line.split()[1:-1] for line in copies), "the build stage copies constraints.txt"
    commands = [part.split() for part in dockerfile.replace("\\\n", " ").split("&&")]
    # pip wheel of the project, and pip install of kubemta: the two that choose the dependencies' versions
    pip_runs = [" ".join(words) for words in commands if len(words) > 2 and words[0].endswith("/bin/pip")
                and (words[1] == "wheel" or (words[1] == "install" and words[-1] == "kubemta"))]
    assert len(pip_runs) == 2, pip_runs
    for command in pip_runs:
        assert "-c constraints.txt" in command, f"Dockerfile: {command!r} ignores constraints.txt"
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert "!constraints.txt" in ignored, ".dockerignore keeps constraints.txt out of the build context"
