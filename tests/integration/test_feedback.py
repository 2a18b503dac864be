"""The feedback loop against real peers: bounce categories, the suppression list, its CLI.

A real ``mta serve`` relays to an aiosmtpd receiver that refuses some
recipients with the reply texts Gmail, Outlook.com and Yahoo document.
Each refusal gets its category on the ``bounced`` event, in
``kubemta_bounces_total`` and in the DSN; an address the receiver called
dead is suppressed and refused at RCPT with ``550 5.1.1`` — across a
restart and to many clients at once — while a reputation refusal
suppresses nothing.  Operators add, show and remove entries with
``mta suppress``; entries expire; ``suppression.action: hold`` accepts and
holds instead.
"""

from __future__ import annotations

import email
import email.policy
import json
import smtplib
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.harness import HOST, MtaServer, send_mail
from tests.obs.logs import events, wait_for_event
from tests.obs.scrape import wait_for_sample
from tests.peers.recorder import Recorder

GMAIL_NO_USER = ("550 5.1.1 The email account that you tried to reach does not exist. Please try "
                 "double-checking the recipient's email address for typos or unnecessary spaces. - gsmtp")
GMAIL_LOW_REPUTATION = ("550 5.7.1 Our system has detected that this message is likely suspicious due to the "
                        "very low reputation of the sending IP address. To best protect our users from "
                        "spam, the message has been blocked. - gsmtp")
OUTLOOK_BLOCKLIST = ("550 5.7.1 Unfortunately, messages from [127.0.0.1] weren't sent. Please contact your "
                     "Internet service provider since part of their network is on our block list (S3150).")
YAHOO_DEFERRED = ("421 4.7.0 [TSS04] Messages from 127.0.0.1 temporarily deferred due to unexpected volume "
                  "or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes")

REFUSALS = {
    "dead@dest.test": GMAIL_NO_USER,
    "warmup@dest.test": GMAIL_LOW_REPUTATION,
    "listed@dest.test": OUTLOOK_BLOCKLIST,
    "slow@dest.test": YAHOO_DEFERRED,
}


@pytest.fixture
def receiver() -> Iterator[Recorder]:
    with Recorder(refuse=REFUSALS) as recorder:
        yield recorder


def mta(tmp_path: Path, receiver: Recorder, extra: dict[str, Any] | None = None) -> MtaServer:
    config = {"routes": [{"domains": ["*"], "relay": f"{HOST}:{receiver.port}", "tls": "none"}],
              "metrics": {"domains": ["dest.test"]},
              "queue": {"retry_initial": "1h", "retry_max": "2h"}}
    server = MtaServer(tmp_path / "mta", {**config, **(extra or {})})
    server.start()
    return server


def rcpt(port: int, recipient: str, sender: str = "app@sender.test") -> tuple[int, str]:
    with smtplib.SMTP(HOST, port, timeout=20) as client:
        client.ehlo("app.kubemta.test")
        client.mail(sender)
        code, text = client.rcpt(recipient)
        return code, text.decode()


def suppress(server: MtaServer, *args: str) -> Any:
    done = server.cli("suppress", *args, "--json")
    return done.returncode, json.loads(done.stdout) if done.stdout.strip() else None


def test_refusals_are_classified_and_only_dead_addresses_are_suppressed(tmp_path: Path, receiver: Recorder) -> None:
    server = mta(tmp_path, receiver)
    try:
        send_mail(server.port, "app@sender.test",
                  ["dead@dest.test", "warmup@dest.test", "listed@dest.test", "slow@dest.test", "fine@dest.test"])
        wait_for_event(server, "bounced", count=3, timeout=30)
        deferred = wait_for_event(server, "deferred", recipient="slow@dest.test", timeout=30)
        categories = {item["recipient"]: item["category"] for item in events(server, "bounced")}
        assert categories == {"dead@dest.test": "invalid_recipient", "warmup@dest.test": "reputation",
                              "listed@dest.test": "reputation"}
        assert deferred[0]["category"] == "reputation"
        scraped = wait_for_sample(server, "kubemta_bounces_total", 1, category="invalid_recipient",
                                  domain="dest.test")
        assert scraped.get("kubemta_bounces_total", category="reputation", domain="dest.test") == 2
        assert scraped.get("kubemta_suppressions_added_total", reason="invalid_recipient", source="bounce") == 1

        # The DSN (relayed to the same receiver) names each recipient's category.
        deadline = time.monotonic() + 30
        while not any(m.mail_from == "<>" or m.mail_from == "" for m in receiver.messages):
            assert time.monotonic() < deadline, "no DSN arrived"
            time.sleep(0.1)
        [dsn] = [m for m in receiver.messages if m.mail_from in ("", "<>")]
        report = email.message_from_bytes(dsn.data, policy=email.policy.default)
        status = report.get_payload()[1].get_payload()
        by_recipient = {str(block["Final-Recipient"]).split(";")[1].strip(): block["X-Kubemta-Bounce-Category"]
                        for block in status[1:]}
        assert by_recipient == {"dead@dest.test": "invalid_recipient", "warmup@dest.test": "reputation",
                                "listed@dest.test": "reputation"}
        assert "(bounce category: invalid_recipient)" in report.get_payload()[0].get_content()

        code, shown = suppress(server, "show", "dead@dest.test")
        assert code == 0 and [(e["reason"], e["source"], e["scope"]) for e in shown] == \
            [("invalid_recipient", "bounce", "global")]
        assert "does not exist" in shown[0]["detail"]
        for address in ("warmup@dest.test", "listed@dest.test", "slow@dest.test", "fine@dest.test"):
            assert suppress(server, "show", address) == (1, [])  # reputation says nothing of the address

        # The next message to the dead address is refused in the session, with why.
        code, text = rcpt(server.port, "Dead@dest.test")
        assert code == 550 and text.startswith("5.1.1 ") and "suppression list" in text
        assert "no such mailbox" in text
        assert rcpt(server.port, "warmup@dest.test")[0] == 250

        # Across a restart, and to many clients at once.
        assert server.terminate() == 0
        server.start()
        with ThreadPoolExecutor(max_workers=8) as pool:
            codes = list(pool.map(lambda n: rcpt(server.port, "dead@dest.test" if n % 2 else "fine@dest.test")[0],
                                  range(32)))
        assert codes.count(550) == 16 and codes.count(250) == 16
        refused = events(server, "rejected", reason="suppressed")
        assert len(refused) == 17 and all(item["suppression_reason"] == "invalid_recipient" for item in refused)
        assert len([m for m in receiver.messages if "dead@dest.test" in m.rcpt_tos]) == 0
    finally:
        server.stop()


def test_operators_add_show_and_remove_entries_while_the_server_runs(tmp_path: Path, receiver: Recorder) -> None:
    server = mta(tmp_path, receiver)
    try:
        assert rcpt(server.port, "person@dest.test")[0] == 250
        code, entry = suppress(server, "add", "Person@dest.test", "--note", "asked to stop")
        assert code == 0 and (entry["address"], entry["reason"], entry["source"], entry["expires"]) == \
            ("person@dest.test", "manual", "operator", None)
        code, text = rcpt(server.port, "person@dest.test")
        assert code == 550 and "an operator suppressed it" in text
        code, listed = suppress(server, "list")
        assert code == 0 and [e["address"] for e in listed] == ["person@dest.test"]
        assert suppress(server, "remove", "person@dest.test") == (0, {"address": "person@dest.test", "removed": 1})
        assert rcpt(server.port, "person@dest.test")[0] == 250
        assert suppress(server, "remove", "person@dest.test")[0] == 1

        # Scoped to one sending domain: other senders still reach the address.
        assert suppress(server, "add", "scoped@dest.test", "--scope", "domain:sender.test",
                        "--reason", "complaint")[0] == 0
        assert rcpt(server.port, "scoped@dest.test", "app@sender.test")[0] == 550
        assert rcpt(server.port, "scoped@dest.test", "app@other.test")[0] == 250

        # Expiry: refused while the entry lasts, accepted once it has passed.
        assert suppress(server, "add", "brief@dest.test", "--expires", "3s")[0] == 0
        assert rcpt(server.port, "brief@dest.test")[0] == 550
        deadline = time.monotonic() + 30
        while rcpt(server.port, "brief@dest.test")[0] != 250:
            assert time.monotonic() < deadline, "the entry did not expire"
            time.sleep(0.5)
        code, shown = suppress(server, "show", "brief@dest.test")
        assert code == 0 and shown[0]["expires"] is not None  # kept, but no longer in force
        assert [e["address"] for e in suppress(server, "list")[1]] == ["scoped@dest.test"]

        bad = server.cli("suppress", "add", "x@dest.test", "--reason", "reputation")
        assert bad.returncode == 2 and "--reason" in bad.stderr
    finally:
        server.stop()


def test_hold_accepts_a_suppressed_recipient_and_keeps_the_message_for_an_operator(
        tmp_path: Path, receiver: Recorder) -> None:
    server = mta(tmp_path, receiver, {"suppression": {"action": "hold"}})
    try:
        assert suppress(server, "add", "held@dest.test")[0] == 0
        queue_id = send_mail(server.port, "app@sender.test", ["held@dest.test", "fine@dest.test"])
        [item] = server.wait_for_queue(lambda items: len(items) == 1, what="one message")
        assert item["id"] == queue_id and item["state"] == "hold"
        assert events(server, "suppressed", recipient="held@dest.test", action="hold")
        assert receiver.messages == []
        assert server.queue("release", queue_id).returncode == 0
        receiver.wait_for(1, timeout=30)
        server.wait_queue_empty(timeout=30)
    finally:
        server.stop()


def test_worker_processes_refuse_what_a_bounce_in_the_main_process_suppressed(
        tmp_path: Path, receiver: Recorder) -> None:
    server = mta(tmp_path, receiver, {"workers": 2})
    try:
        send_mail(server.port, "app@sender.test", ["dead@dest.test"])
        wait_for_event(server, "suppression_added", recipient="dead@dest.test", timeout=30)
        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(lambda n: rcpt(server.port, "dead@dest.test"), range(24)))
        assert all(code == 550 and "suppression list" in text for code, text in results)
        # The workers serve the listener, so the refusals came from them, not the main process.
        [started] = events(server, "started")
        refused = events(server, "rejected", reason="suppressed")
        assert len(refused) == 24 and started["pid"] not in {item["pid"] for item in refused}
    finally:
        server.stop()
