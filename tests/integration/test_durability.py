"""Nothing that got a 250 is lost: kill -9 at several points, restarts, damaged spools."""

from __future__ import annotations

import re
import smtplib
import socket
import subprocess
import threading
import time
from pathlib import Path

from spool import Recipient, Record, Spool
from spool.ids import new_id
from tests.ci import require
from tests.conftest import HOSTS, World
from tests.harness import send_mail
from tests.obs.logs import events, wait_for_event

END = "END-OF-MESSAGE"


def queue_ids_in(sink) -> list[str]:  # type: ignore[no-untyped-def]
    ids = []
    for message in sink.messages():
        assert END.encode() in message.data, "a delivered message must be complete"
        ids.append(re.search(rb"\(kubemta\) with E?SMTP id ([0-9A-Z]+)", message.data).group(1).decode())
    return ids


def test_kill_during_data_keeps_nothing_of_the_transaction(world: World) -> None:
    sink = world.sink("dest")
    server = world.mta()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    reader = sock.makefile("rb")
    reader.readline()
    for line in (b"EHLO x.kubemta.test", b"MAIL FROM:<a@sender.test>", b"RCPT TO:<b@dest.test>", b"DATA"):
        sock.sendall(line + b"\r\n")
        while reader.readline()[3:4] == b"-":
            pass
    sock.sendall(b"Subject: cut short\r\n\r\n" + b"line\r\n" * 1000)
    time.sleep(0.3)
    server.kill9()
    sock.close()
    server.start()
    assert server.queue_list() == []
    time.sleep(1)
    assert sink.messages() == []
    assert list((server.spool_dir / "msg").iterdir()) == []


def test_kill_while_clients_are_sending_loses_no_acknowledged_message(world: World) -> None:
    server = world.mta()  # the MX of down.test does not answer yet: mail stays queued
    acked: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def client(n: int) -> None:
        for i in range(200):  # bounded; the kill ends it sooner
            if stop.is_set():
                return
            try:
                queue_id = send_mail(server.port, "a@sender.test", ["user@down.test"],
                                     body=f"client {n} message {i}\r\n{END}\r\n")
            except (OSError, smtplib.SMTPException, AssertionError):
                return
            with lock:
                acked.append(queue_id)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 15
    while len(acked) < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    server.kill9()
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    assert len(acked) >= 20
    sink = world.sink("down")
    server.start()
    assert server.queue("flush").returncode == 0
    server.wait_queue_empty(timeout=60)
    delivered = queue_ids_in(sink)
    assert set(acked) <= set(delivered), f"lost: {set(acked) - set(delivered)}"
    # At most the messages whose 250 was on the wire when the process died are extra.
    assert len(set(delivered) - set(acked)) <= len(threads)
    assert len(delivered) == len(set(delivered)), "each message is delivered once"


def test_kill_during_delivery_delivers_after_restart(world: World) -> None:
    slow = world.sink("dest", ["-w", "5"])  # waits before answering DATA
    server = world.mta()
    queue_id = send_mail(server.port, "a@sender.test", ["user@dest.test"], body=f"x\r\n{END}\r\n")
    wait_for_event(server, "attempt")
    time.sleep(0.5)
    server.kill9()
    slow.restart([])
    server.start()
    assert server.queue("flush").returncode == 0
    slow.wait_for_messages(1, timeout=30)
    server.wait_queue_empty()
    assert queue_ids_in(slow) == [queue_id]


def prefill(spool_dir: Path, count: int) -> list[str]:
    spool = Spool(spool_dir)
    spool.open()
    ids = []
    try:
        for i in range(count):
            now = time.time()
            record = Record(id=new_id(), sender="a@sender.test", recipients=[Recipient(f"u{i}@dest.test")],
                            created=now, expires=now + 3600, next_attempt=now, size=0)
            body = f"Subject: prefilled {i}\r\nReceived: from x (kubemta) with ESMTP id {record.id}\r\n\r\n{END}\r\n"
            ids.append(spool.store_blocking(body.encode(), record).id)
    finally:
        spool.close()
    return ids


def test_restart_with_a_prefilled_and_partly_damaged_spool(world: World) -> None:
    sink = world.sink("dest")
    server = world.mta(start=False)
    ids = prefill(server.spool_dir, 5)
    (server.spool_dir / "incoming" / f"{ids[1]}.json").write_bytes(b"{ truncated")
    (server.spool_dir / "incoming" / f"{ids[2]}.json").write_bytes(b"")
    (server.spool_dir / "msg" / ids[3]).write_bytes(b"Subj")
    server.start()
    delivered = sink.wait_for_messages(2, timeout=30)
    server.wait_queue_empty()
    assert sorted(m.recipients[0] for m in delivered) == ["u0@dest.test", "u4@dest.test"]
    quarantined = sorted(p.name for p in (server.spool_dir / "corrupt").iterdir())
    assert len(quarantined) == 6  # three metadata files and their three message files
    assert events(server, "spool_loaded")[-1]["quarantined"] == 6
    assert server.proc is not None and server.proc.poll() is None


def test_a_second_server_on_the_same_spool_refuses_to_start(world: World) -> None:
    server = world.mta()
    done = server.cli("serve", timeout=30)
    assert done.returncode == 1
    assert "in use by process" in done.stderr and "only one server may own a spool" in done.stderr
    assert server.readyz()[0] == 200


def test_sigterm_stops_cleanly_and_keeps_queued_mail(world: World) -> None:
    server = world.mta()
    queue_id = send_mail(server.port, "a@sender.test", ["user@down.test"])
    server.wait_for_queue(lambda q: q and q[0]["attempts"] >= 1)
    assert server.terminate(timeout=20) == 0
    assert events(server, "stopped")
    assert [item["id"] for item in server.queue_list()] == [queue_id]  # read offline from the spool
    server.start()
    assert [item["id"] for item in server.queue_list()] == [queue_id]
    assert HOSTS["down"] in server.queue_list()[0]["recipients"][0]["last_reply"]


def test_full_spool_answers_451_and_keeps_nothing(world: World) -> None:
    server = world.mta(start=False)
    mountpoint = Path(server.config["spool"]["path"])
    mountpoint.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mountpoint)],
                             capture_output=True)
    require(mounted.returncode == 0, f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        server.start()
        small = send_mail(server.port, "a@sender.test", ["user@down.test"])
        with smtplib.SMTP("127.0.0.1", server.port, timeout=20) as client:
            client.ehlo("app.kubemta.test")
            client.mail("a@sender.test")
            client.rcpt("user@down.test")
            code, text = client.data(b"Subject: too big for the disk\r\n\r\n" + (b"x" * 998 + b"\r\n") * 1000)
        assert (code, text.split(b" ", 1)[0]) == (451, b"4.3.0")
        assert [item["id"] for item in server.queue_list()] == [small]
        assert sorted(p.name for p in (server.spool_dir / "msg").iterdir()) == [small]
        assert list((server.spool_dir / "tmp").iterdir()) == []
        assert events(server, "rejected")
    finally:
        server.stop()
        subprocess.run(["umount", str(mountpoint)], check=False)
