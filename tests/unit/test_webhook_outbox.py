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
