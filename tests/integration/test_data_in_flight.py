"""DATA held in memory is bounded across sessions: 20 clients of 24 MiB at once.

A real ``mta serve`` with the default 25 MiB message size; 20 clients send
a 24 MiB message each at the same moment.  The server's peak resident set
(``VmHWM`` in /proc) must stay under 300 MB; the clients past
``limits.max_data_in_flight`` get ``452 4.3.1``; every message that got a
``250`` is in the queue, and nothing else is.
"""

from __future__ import annotations

import smtplib
import threading
from pathlib import Path

from tests.conftest import World

SIZE = 24 * 1024 * 1024
CLIENTS = 20


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_twenty_parallel_24_mib_messages_stay_under_300_mb(world: World) -> None:
    # Delivery goes nowhere (no receiver on the port): the mail stays queued for counting.
    server = world.mta({"delivery": {"port": 9}})
    assert server.proc is not None
    body = (b"x" * 76 + b"\r\n") * (SIZE // 78)
    message = b"From: <app@sender.test>\r\nSubject: big\r\n\r\n" + body
    start = threading.Barrier(CLIENTS)
    replies: list[tuple[int, str]] = []
    lock = threading.Lock()

    def client() -> None:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=300) as smtp:
            smtp.ehlo("app.kubemta.test")
            smtp.mail("app@sender.test")
            smtp.rcpt("big@dest.test")
            start.wait(timeout=60)
            code, text = smtp.data(message)
        with lock:
            replies.append((code, text.decode()))

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert len(replies) == CLIENTS, replies
    peak = peak_rss(server.proc.pid)
    accepted = [text for code, text in replies if code == 250]
    refused = [(code, text) for code, text in replies if code != 250]
    assert accepted, replies
    assert all(code == 452 and text.startswith("4.3.1") for code, text in refused), refused
    queued = server.queue_list()
    assert len(queued) == len(accepted), (len(queued), len(accepted))
    assert peak < 300 * 1024 * 1024, f"peak RSS {peak / 2**20:.0f} MiB; {len(accepted)} accepted"
