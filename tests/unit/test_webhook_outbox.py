"""The webhook outbox on disk: durable batches, crash leftovers cleared, the shared retry schedule."""

from __future__ import annotations

import random
from pathlib import Path

from mta.config import WebhookEndpoint, WebhooksConfig
from mta.obs.webhooks import MIN_RETRY_DELAY, RETRY_JITTER, Webhooks
from mta.scheduler.backoff import retry_delay
from spool import safeio
from tests.unit.conftest import Journal


def webhooks(tmp_path: Path) -> Webhooks:
    secret = tmp_path / "secret"
    secret.write_text("k\n")
    endpoints = [WebhookEndpoint(name=name, url="https://hooks.example/x", secret_file=secret)
                 for name in ("crm", "audit")]
    config = WebhooksConfig(endpoints=endpoints, retry_initial=0.01, retry_max=1)
    return Webhooks(config, tmp_path / "webhooks", "mta.example", rng=random.Random(3))


def test_a_batch_is_flushed_then_renamed_then_each_folder_flushed_once(tmp_path: Path,
                                                                      disk_journal: Journal) -> None:
    hooks = webhooks(tmp_path)
    crm, audit = hooks.endpoints
    for endpoint in hooks.endpoints:
        endpoint.folder.mkdir(parents=True)
    hooks._persist([(crm, "1.json", b"{}"), (audit, "1.json", b"{}"), (crm, "2.json", b"{}")])
    assert [kind for kind, _ in disk_journal] == ["fsync"] * 3 + ["rename"] * 3 + ["fsync"] * 2
    assert {path for _, path in disk_journal[-2:]} == {crm.folder.resolve(), audit.folder.resolve()}
    assert sorted(p.name for p in crm.folder.iterdir()) == ["1.json", "2.json"]
    assert (crm.folder / "1.json").stat().st_mode & 0o777 == 0o640


def test_leftovers_of_a_crash_are_cleared_at_start(tmp_path: Path) -> None:
    hooks = webhooks(tmp_path)
    crm = hooks.endpoints[0]
    crm.folder.mkdir(parents=True)
    (crm.folder / "1.json").write_bytes(b"{}")
    safeio.temporary_path(crm.folder / "2.json").write_bytes(b"{")
    (crm.folder / "3.tmp").write_bytes(b"{")  # the name earlier versions used
    hooks._prepare()
    assert [p.name for p in crm.folder.iterdir()] == ["1.json"] and crm.waiting == 1


def test_failed_posts_back_off_on_the_mail_queue_schedule(tmp_path: Path) -> None:
    hooks = webhooks(tmp_path)
    rng = random.Random(3)
    expected = [retry_delay(n, 0.01, 1, RETRY_JITTER, rng, floor=MIN_RETRY_DELAY) for n in range(1, 9)]
    assert [hooks._backoff(n) for n in range(1, 9)] == expected
    assert expected[0] == MIN_RETRY_DELAY and 0.8 <= expected[-1] <= 1.2


def test_rejected_events_are_opt_in_and_rate_limited(tmp_path: Path) -> None:
    import asyncio

    import pytest

    from mta.config import ConfigError, load
    from mta.obs.metrics import Metrics
    from mta.obs.webhooks import REJECTED_PER_MINUTE

    secret = tmp_path / "secret"
    secret.write_text("k\n")
    default = WebhookEndpoint(name="crm", url="https://hooks.example/x", secret_file=secret)
    assert "rejected" not in default.events and "bounced" in default.events
    flood = WebhookEndpoint(name="audit", url="https://hooks.example/y", secret_file=secret,
                            events=["rejected", "bounced"])
    metrics = Metrics()
    hooks = Webhooks(WebhooksConfig(endpoints=[flood]), tmp_path / "webhooks", "mta.example", metrics)

    async def main() -> None:
        hooks._loop = asyncio.get_running_loop()
        writer = asyncio.create_task(hooks._write_loop())
        for n in range(REJECTED_PER_MINUTE + 40):
            hooks.on_event("rejected", {"client": f"192.0.2.{n % 250}", "reply": "554 5.7.1 Relay access denied"})
        hooks.on_event("bounced", {"queue_id": "Q1", "recipient": "a@example.net"})
        for _ in range(200):
            await asyncio.sleep(0.01)
            if not hooks._pending:
                break
        writer.cancel()

    hooks.endpoints[0].folder.mkdir(parents=True)
    asyncio.run(main())
    stored = [p.read_text() for p in hooks.endpoints[0].folder.iterdir()]
    assert sum('"event":"rejected"' in text or '"event": "rejected"' in text for text in stored) == \
        REJECTED_PER_MINUTE
    assert any("bounced" in text for text in stored), "the flood must not push a real event out"
    assert b'kubemta_webhook_dropped_total{endpoint="audit",reason="rate"} 40.0' in metrics.render()
    empty = tmp_path / "empty"
    empty.write_text("\n")
    config_file = tmp_path / "mta.yaml"
    config_file.write_text(f"webhooks:\n  endpoints:\n    - {{name: crm, url: 'https://hooks.example/x', "
                           f"secret_file: '{empty}'}}\n")
    with pytest.raises(ConfigError, match=r"webhooks\.endpoints\.0\.secret_file.*HMAC key, is empty"):
        load(config_file)
