"""What ``mta queue`` and ``log.format: text`` put on a terminal: never a peer's raw control characters."""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path

from mta.obs import log as obs_log
from spool import Recipient, Record, Spool
from spool.ids import new_id
from tests.harness import MtaServer

CLEAR = "\x1b[2J"


def queued_with_hostile_reply(server: MtaServer) -> str:
    """A stopped server's spool holding one message whose remote reply and header carry escapes."""
    spool = Spool(server.spool_dir)
    spool.open()
    try:
        now = time.time()
        record = Record(id=new_id(), sender="a@sender.test",
                        recipients=[Recipient("b@dest.test", last_reply=f"550 5.1.1 gone{CLEAR}\x9b31m")],
                        created=now, expires=now + 86400, next_attempt=now + 3600, size=0, attempts=1)
        data = f"Subject: hi{CLEAR}\r\nX-Title: \x1b]0;owned\x07\r\n\r\nbody\r\n".encode()
        return spool.store_blocking(data, record).id
    finally:
        spool.close()


def test_queue_list_and_show_escape_control_characters(tmp_path: Path) -> None:
    server = MtaServer(tmp_path, {})
    queue_id = queued_with_hostile_reply(server)
    listed = server.queue("list")
    assert listed.returncode == 0, listed.stderr
    assert "\x1b" not in listed.stdout and "\x9b" not in listed.stdout
    assert "550 5.1.1 gone\\x1b[2J\\x9b31m" in listed.stdout
    shown = server.queue("show", queue_id)
    assert shown.returncode == 0, shown.stderr
    assert "\x1b" not in shown.stdout and "\x07" not in shown.stdout
    assert "Subject: hi\\x1b[2J" in shown.stdout and "X-Title: \\x1b]0;owned\\x07" in shown.stdout
    # JSON output stays JSON: the encoder escapes, and the value round-trips exactly.
    as_json = server.queue("list", "--json").stdout
    assert "\x1b" not in as_json
    assert json.loads(as_json)[0]["recipients"][0]["last_reply"].endswith(f"gone{CLEAR}\x9b31m")


def test_text_log_escapes_control_characters_and_json_stays_json() -> None:
    stream = io.StringIO()
    try:
        obs_log.setup("info", "text", stream)
        obs_log.event("deferred", queue_id="Q1", reply=f"451 later{CLEAR}", remote=f"mx{CLEAR}")
        logging.getLogger("mta.x").warning("peer said %s", f"hi{CLEAR}\r\n")
        text = stream.getvalue()
        assert "\x1b" not in text and "\r" not in text
        assert 'reply="451 later\\x1b[2J"' in text and 'remote="mx\\x1b[2J"' in text
        assert "peer said hi\\x1b[2J\\x0d\\x0a" in text
        assert len(text.splitlines()) == 2

        stream = io.StringIO()
        obs_log.setup("info", "json", stream)
        obs_log.event("deferred", queue_id="Q1", reply=f"451 later{CLEAR}")
        [line] = stream.getvalue().splitlines()
        assert "\x1b" not in line
        assert json.loads(line)["reply"] == f"451 later{CLEAR}"
    finally:
        obs_log.setup("warning", "text")
