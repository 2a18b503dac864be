"""``mta queue`` against a running server (through its control socket) and a stopped one (on the spool)."""

from __future__ import annotations

import email
import email.policy
import json

from tests.conftest import World
from tests.harness import MtaServer, send_mail


def queued(server: MtaServer, count: int) -> list[str]:
    ids = [send_mail(server.port, "a@sender.test", [f"user{i}@down.test"], subject=f"m{i}") for i in range(count)]
    server.wait_for_queue(lambda q: len(q) == count and all(item["attempts"] >= 1 for item in q),
                          what="all attempted once")
    return ids


def by_id(server: MtaServer) -> dict[str, dict]:  # type: ignore[type-arg]
    return {item["id"]: item for item in server.queue_list()}


def test_list_json_has_the_documented_fields(world: World) -> None:
    server = world.mta()
    [queue_id] = queued(server, 1)
    [item] = server.queue_list()
    assert {"id", "sender", "recipients", "attempts", "state", "next_attempt", "created", "size"} <= set(item)
    assert item["id"] == queue_id and item["sender"] == "a@sender.test" and item["state"] == "deferred"
    assert item["recipients"][0]["address"] == "user0@down.test"
    assert item["recipients"][0]["state"] == "pending"
    assert "cannot connect" in item["recipients"][0]["last_reply"]
    text = server.queue("list").stdout
    assert queue_id in text and "user0@down.test" in text
    shown = server.queue("show", queue_id, "--json")
    assert shown.returncode == 0
    assert "Subject: m0" in json.loads(shown.stdout)[queue_id]["header"]


def test_hold_release_delete_bounce_while_running(world: World) -> None:
    sender = world.sink("sender")
    server = world.mta()
    held, deleted, bounced = queued(server, 3)

    assert server.queue("hold", held).stdout.strip() == f"{held}: ok"
    assert by_id(server)[held]["state"] == "hold"
    attempts = by_id(server)[held]["attempts"]
    assert server.queue("flush").returncode == 0
    server.wait_for_queue(lambda q: all(i["attempts"] > 1 for i in q if i["id"] != held), what="flushed")
    assert by_id(server)[held]["attempts"] == attempts  # held mail is not tried

    assert server.queue("delete", deleted).returncode == 0
    assert deleted not in by_id(server)

    assert server.queue("bounce", bounced).returncode == 0
    [notice] = sender.wait_for_messages(1, timeout=20)
    report = email.message_from_bytes(notice.data, policy=email.policy.default).get_payload()[1].get_payload()[1]
    assert report["Final-Recipient"] == "rfc822; user2@down.test"
    assert "administrator" in report["Diagnostic-Code"]

    down = world.sink("down")
    assert server.queue("release", held).returncode == 0
    assert down.wait_for_messages(1, timeout=20)[0].recipients == ["user0@down.test"]
    server.wait_queue_empty()
    assert len(sender.messages()) == 1  # the deleted message did not bounce


def test_unknown_ids_are_reported(world: World) -> None:
    server = world.mta()
    done = server.queue("hold", "NOSUCHID00000000")
    assert done.returncode == 1 and "unknown id" in done.stdout
    done = server.queue("show", "NOSUCHID00000000")
    assert done.returncode == 1 and "unknown id" in done.stderr


def test_queue_commands_work_on_the_spool_when_no_server_runs(world: World) -> None:
    server = world.mta()
    first, second = queued(server, 2)
    assert server.terminate() == 0
    assert sorted(by_id(server)) == sorted([first, second])
    assert server.queue("hold", first).stdout.strip() == f"{first}: ok"
    assert server.queue("delete", second).returncode == 0
    down = world.sink("down")
    server.start()
    assert list(by_id(server)) == [first] and by_id(server)[first]["state"] == "hold"
    assert server.queue("release", first).returncode == 0
    down.wait_for_messages(1, timeout=20)
    server.wait_queue_empty()


def test_mta_send_prints_the_queue_id_and_waits_for_the_outcome(world: World) -> None:
    dest = world.sink("dest")
    server = world.mta()
    done = server.cli("send", "--to", "user@dest.test", "--subject", "from mta send", "--wait", "--timeout", "60",
                      timeout=90)
    assert done.returncode == 0, done.stderr + done.stdout
    lines = done.stdout.splitlines()
    queue_id = lines[0]
    assert queue_id.isalnum() and len(queue_id) >= 8
    assert lines[-1].startswith(f"{queue_id}: left the queue")
    [message] = dest.wait_for_messages(1, timeout=20)
    assert message.recipients == ["user@dest.test"]
    parsed = email.message_from_bytes(message.data, policy=email.policy.default)
    assert parsed["Subject"] == "from mta send" and parsed["From"] == "postmaster@mta.kubemta.test"


def test_mta_send_wait_reports_deferrals_and_gives_up_with_exit_1(world: World) -> None:
    server = world.mta()
    done = server.cli("send", "--to", "user@down.test", "--body", "deferred\n", "--wait", "--timeout", "5", timeout=60)
    assert done.returncode == 1
    queue_id = done.stdout.splitlines()[0]
    assert f"{queue_id}: <user@down.test> pending" in done.stdout
    assert "still queued" in done.stderr
    assert [item["id"] for item in server.queue_list()] == [queue_id]


def test_trace_shows_each_attempt_with_its_mx_and_reply_online_and_offline(world: World) -> None:
    from tests.conftest import HOSTS

    world.sink("flaky", ["-r", "RCPT"])  # 450 to every RCPT: deferred each time
    server = world.mta()
    queue_id = send_mail(server.port, "a@sender.test", ["user@flaky.test"], body="trace me\r\n")
    server.wait_for_queue(lambda q: q and q[0]["attempts"] >= 1, what="one failed attempt")
    assert server.queue("flush", queue_id).returncode == 0
    server.wait_for_queue(lambda q: q and q[0]["attempts"] >= 2, what="two failed attempts")

    def check(traced: dict) -> None:  # type: ignore[type-arg]
        rounds = traced[queue_id]["history"]
        assert [r["attempt"] for r in rounds] == [1, 2]
        for r in rounds:
            [result] = r["results"]
            assert result["address"] == "user@flaky.test"
            assert result["mx_ip"] == HOSTS["flaky"] and result["mx_host"]
            assert result["reply"].startswith("450 4.3.0")
        assert traced[queue_id]["history_dropped"] == 0

    online = server.queue("trace", queue_id, "--json")
    assert online.returncode == 0, online.stderr
    check(json.loads(online.stdout))
    text = server.queue("trace", queue_id).stdout
    assert "attempt 1 at" in text and "attempt 2 at" in text and f"[{HOSTS['flaky']}]" in text
    assert "no TLS" in text  # smtp-sink offers no STARTTLS here
    assert text.count("450 4.3.0") >= 2

    assert server.terminate() == 0
    offline = server.queue("trace", queue_id, "--json")
    assert offline.returncode == 0, offline.stderr
    check(json.loads(offline.stdout))
    assert server.queue("trace", "NOSUCHID00000000").returncode == 1


def test_show_body_prints_the_stored_message_escaped_or_raw_to_a_pipe(world: World) -> None:
    server = world.mta()
    [queue_id] = queued(server, 1)
    escape_me = "body line\x1b[2J here"
    other = send_mail(server.port, "a@sender.test", ["x@down.test"], body=escape_me + "\r\n")
    server.wait_for_queue(lambda q: len(q) == 2, what="two queued")
    unreached = server.queue("trace", queue_id).stdout  # down.test's MX does not answer
    assert "attempt 1 at" in unreached and "no session" in unreached and "cannot connect" in unreached
    for running in (True, False):
        shown = server.queue("show", queue_id, "--body")
        assert shown.returncode == 0, shown.stderr
        assert "Subject: m0" in shown.stdout and "hello" in shown.stdout
        escaped = server.queue("show", other, "--body").stdout
        assert "\x1b" not in escaped and "\\x1b[2J" in escaped
        raw = server.queue("show", other, "--body", "--raw")  # stdout is a pipe here
        assert raw.returncode == 0 and "\x1b[2J" in raw.stdout and raw.stdout.startswith("Received:")
        as_json = json.loads(server.queue("show", other, "--body", "--json").stdout)
        assert escape_me in as_json[other]["message"]
        if running:
            assert server.terminate() == 0
