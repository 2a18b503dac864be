"""What the peer self-tests need beyond tests.peers.fixtures: a clear up-front
failure (not a skip, so CI cannot go green by accident) when this machine
cannot run the real peers -- not root, or unbound/postfix/smtp-sink missing.
Deselect with `-m "not integration"` where they cannot run.
"""

from __future__ import annotations

import os
import shutil

import pytest

REQUIRED_TOOLS = ("unbound", "smtp-sink", "postfix", "postconf")


@pytest.fixture(scope="session")
def peer_tools() -> None:
    problems = [f"{tool} not on PATH" for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if os.geteuid() != 0:
        problems.append("not running as root (Postfix and smtp-sink -u nobody need it)")
    if problems:
        pytest.fail("cannot run real test peers: " + "; ".join(problems), pytrace=False)
