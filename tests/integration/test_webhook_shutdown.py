"""``mta serve`` with webhooks stops on SIGTERM promptly, even while an endpoint never answers."""

from __future__ import annotations

import asyncio
import smtplib
import socket
import threading
import time
from pathlib import Path

from mta.config import WebhookEndpoint, WebhooksConfig
from mta.obs.webhooks import Webhooks
from tests.conftest import World
from tests.harness import HOST


class SilentReceiver:
    """Accepts connections and reads what is sent, never answering: a hung webhook endpoint."""

    def __init__(self) -> None:
        self.sock = socket.create_server((HOST, 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = threading.Event()
        self.clients: list[socket.socket] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            self.clients.append(client)
            self.accepted.set()

    def stop(self) -> None:
        self.sock.close()
        for client in self.clients:
            client.close()


def test_sigterm_stops_the_server_while_a_webhook_post_hangs(world: World) -> None:
    receiver = SilentReceiver()
    world.others.append(receiver)
    secret = world.root / "webhook.secret"
    secret.write_text("webhook-secret-for-tests\n")
    secret.chmod(0o600)
    server = world.mta({"webhooks": {"endpoints": [
        {"name": "hung", "url": f"http://{HOST}:{receiver.port}/events", "secret_file": str(secret),
         "events": ["rejected"], "timeout": "120s"}]}})
    # An idle session at SIGTERM is told 421, a "rejected" event: it reaches the
    # outbox while the server stops, and its sender was idle until then.
    client = smtplib.SMTP(HOST, server.port, timeout=30)
    client.ehlo("client.test")
    time.sleep(0.5)
    started = time.monotonic()
    assert server.terminate(timeout=40) == 0
    took = time.monotonic() - started
    client.close()
    # The harness gives sessions and deliveries shutdown.timeout 5s; webhooks
    # may add their own 5s at most, never an endpoint's POST timeout.
    assert took < 12, f"mta serve took {took:.1f}s to stop after SIGTERM"
    assert "event=rejected" in server.log() and receiver.accepted.is_set()


def test_stop_is_bounded_when_the_last_events_wake_an_idle_sender(tmp_path: Path) -> None:
    """The shutdown race itself: events written by ``stop`` wake the sender as it is cancelled.

    On Python 3.11 ``asyncio.wait_for`` returned instead of raising when its
    awaited event fired together with the cancellation; the sender then
    POSTed to the silent endpoint for its whole timeout and ``stop`` waited.
    """
    receiver = SilentReceiver()
    secret = tmp_path / "secret"
    secret.write_text("k\n")
    endpoint = WebhookEndpoint(name="hung", url=f"http://{HOST}:{receiver.port}/x", secret_file=secret,
                               events=["deferred"], timeout=120)
    hooks = Webhooks(WebhooksConfig(endpoints=[endpoint]), tmp_path / "webhooks", "mta.example")

    async def run() -> float:
        await hooks.start()
        await asyncio.sleep(0.2)  # the sender is idle: its outbox is empty
        hooks.on_event("deferred", {"queue_id": "Q1"})
        started = time.monotonic()
        stopping = asyncio.ensure_future(hooks.stop(timeout=2.0))
        done, _ = await asyncio.wait({stopping}, timeout=10)
        assert done, "Webhooks.stop still waiting after 10s"
        return time.monotonic() - started

    try:
        took = asyncio.run(run())
    finally:
        receiver.stop()
    assert took < 5, f"stop took {took:.1f}s"
    # The event was written before the senders stopped: it waits in the outbox for the next start.
    assert [p.suffix for p in (tmp_path / "webhooks" / "hung").iterdir()] == [".json"]
