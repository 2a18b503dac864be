"""Asynchronous bounces and complaints: a real ``mta serve`` hears back on its feedback listener.

kubemta delivers to a real receiving MTA (smtp-sink) with a signed VERP
return path; the test then plays that receiver's side of a later report,
over real SMTP from the receiver's own address, with SPF records in the
test DNS (unbound):

- a DSN (RFC 3464) from the receiver's address (SPF pass) is matched to its
  message and recipient, classified, suppresses the address (the next
  message to it is refused at RCPT) and is kept with its
  Authentication-Results;
- the same DSN from an address SPF does not allow is recorded and emitted
  but suppresses nothing;
- a return path with a forged tag matches nothing; mail for any other
  domain is not taken;
- an ARF complaint (RFC 5965) sent to the feedback address, not the return
  path, is matched by its Original-Mail-From and suppresses as a complaint;
- an ARF complaint from an address SPF fails, DKIM-signed by the receiver's
  domain (with Mail::DKIM, not the verifier's library), is trusted; the same
  report altered after signing is not;
- eight receivers reporting at once each suppress their own recipient.
"""

from __future__ import annotations

import smtplib
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mta.feedback.verp import ReturnPaths, Tagged
from tests.conftest import HOSTS, World
from tests.harness import HOST, MtaServer, send_mail
from tests.obs.logs import events, wait_for_event
from tests.obs.scrape import scrape
from tests.peers.net import free_port

DOMAIN = "bounces.sender.test"
KEY = "feedback-test-key-0123456789abcdef"
FORGER = "127.0.0.12"  # not in dest.test's SPF record


def feedback_mta(world: World) -> tuple[MtaServer, int]:
    secret = world.root / "feedback-secret"
    secret.write_text(KEY + "\n")
    secret.chmod(0o600)
    port = free_port(HOST)
    server = world.mta({
        "listeners": [{"name": "relay", "address": f"{HOST}:{{port}}", "mode": "relay",
                       "trusted_networks": ["127.0.0.1/32"]},
                      {"name": "feedback", "address": f"{HOST}:{port}", "mode": "feedback"}],
        "feedback": {"domain": DOMAIN, "secret_file": str(secret)},
        "identity": {"sending_domains": ["sender.test"]},
    })
    return server, port


def dsn(return_path: str, recipient: str, status: str, diagnostic: str) -> bytes:
    return (f"From: Mail Delivery System <MAILER-DAEMON@mx.dest.test>\r\nTo: {return_path}\r\n"
            "Subject: Undelivered Mail Returned to Sender\r\nAuto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n"
            'Content-Type: multipart/report; report-type=delivery-status; boundary="dsn-b"\r\n\r\n'
            "--dsn-b\r\nContent-Type: text/plain\r\n\r\nThe mail system could not deliver your message.\r\n"
            "--dsn-b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.dest.test\r\n\r\n"
            f"Final-Recipient: rfc822; {recipient}\r\nOriginal-Recipient: rfc822;{recipient}\r\nAction: failed\r\n"
            f"Status: {status}\r\nRemote-MTA: dns; store.dest.test\r\nDiagnostic-Code: smtp; {diagnostic}\r\n\r\n"
            f"--dsn-b\r\nContent-Type: text/rfc822-headers\r\n\r\nReturn-Path: <{return_path}>\r\n"
            f"From: news@sender.test\r\nTo: {recipient}\r\nSubject: test\r\n\r\n--dsn-b--\r\n").encode()


def arf(return_path: str, recipient: str) -> bytes:
    return ("From: Feedback Loop <fbl@dest.test>\r\nTo: fbl@bounces.sender.test\r\nSubject: complaint\r\n"
            'MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=feedback-report; boundary="arf-b"\r\n'
            "\r\n--arf-b\r\nContent-Type: text/plain\r\n\r\nThis is an email abuse report.\r\n"
            "--arf-b\r\nContent-Type: message/feedback-report\r\n\r\nFeedback-Type: abuse\r\n"
            f"User-Agent: dest-fbl/1.0\r\nVersion: 1\r\nOriginal-Mail-From: <{return_path}>\r\n"
            f"Original-Rcpt-To: <{recipient}>\r\nReported-Domain: sender.test\r\n\r\n"
            f"--arf-b\r\nContent-Type: message/rfc822\r\n\r\nFrom: news@sender.test\r\nTo: {recipient}\r\n"
            "Subject: test\r\n\r\nhello\r\n--arf-b--\r\n").encode()


def report(port: int, source: str, mail_from: str, recipient: str, data: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP(HOST, port, timeout=20, source_address=(source, 0)) as client:
        client.ehlo("mx.dest.test")
        assert client.mail(mail_from)[0] == 250
        code, text = client.rcpt(recipient)
        if code != 250:
            return code, text
        return client.data(data)


def delivered_return_path(world: World, server: MtaServer, recipient: str, count: int) -> str:
    queue_id = send_mail(server.port, "news@sender.test", [recipient])
    message = world.sinks["dest"].wait_for_messages(count, timeout=30)[-1]
    assert ReturnPaths(DOMAIN, KEY.encode()).parse(message.sender) == Tagged(queue_id, recipient)
    return message.sender


def test_a_trusted_dsn_suppresses_and_a_forged_one_does_not(world: World) -> None:
    world.sink("dest")
    server, port = feedback_mta(world)
    alice = delivered_return_path(world, server, "alice@dest.test", 1)
    bob = delivered_return_path(world, server, "bob@dest.test", 2)
    gone = "550 5.1.1 <{0}>: Recipient address rejected: User unknown in virtual mailbox table"
    assert report(port, HOSTS["dest"], "", alice, dsn(alice, "alice@dest.test", "5.1.1",
                                                      gone.format("alice@dest.test")))[0] == 250
    assert report(port, FORGER, "", bob, dsn(bob, "bob@dest.test", "5.1.1", gone.format("bob@dest.test")))[0] == 250

    [trusted] = wait_for_event(server, "bounced", source="report", recipient="alice@dest.test")
    assert (trusted["category"], trusted["spf"], trusted["trusted"]) == ("invalid_recipient", "pass", True)
    [forged] = wait_for_event(server, "bounced", source="report", recipient="bob@dest.test")
    assert (forged["spf"], forged["trusted"]) == ("fail", False)
    wait_for_event(server, "suppression_added", source="report", recipient="alice@dest.test")
    assert not events(server, "suppression_added", recipient="bob@dest.test")

    with smtplib.SMTP(HOST, server.port, timeout=20) as client:
        client.ehlo("app.kubemta.test")
        client.mail("news@sender.test")
        code, text = client.rcpt("alice@dest.test")
        assert (code, text[:5]) == (550, b"5.1.1")
        assert client.rcpt("bob@dest.test")[0] == 250  # an untrusted report said nothing about bob

    metrics = scrape(server)
    assert metrics.get("kubemta_sending_domain_sent_total", sending_domain="sender.test") == 2
    # Both bounced; only the proven report counts toward the domain's hard-bounce rate.
    assert metrics.get("kubemta_sending_domain_bounces_total", sending_domain="sender.test",
                       category="invalid_recipient") == 1
    assert metrics.get("kubemta_bounces_total", category="invalid_recipient", domain="other") == 2

    kept = sorted((Path(server.config["spool"]["path"]) / "feedback").glob("*.eml"))
    assert len(kept) == 2
    headers = [path.read_bytes().split(b"\r\n", 1)[0] for path in kept]
    assert sorted(headers) == [b"Authentication-Results: mta.kubemta.test; spf=fail smtp.helo=mx.dest.test; dkim=none",
                               b"Authentication-Results: mta.kubemta.test; spf=pass smtp.helo=mx.dest.test; dkim=none"]


def test_a_forged_tag_matches_nothing_and_other_domains_are_not_taken(world: World) -> None:
    world.sink("dest")
    server, port = feedback_mta(world)
    real = delivered_return_path(world, server, "carol@dest.test", 1)
    forged = real.replace("carol=dest.test", "dave=dest.test")  # another recipient under carol's tag
    assert report(port, HOSTS["dest"], "", forged, dsn(forged, "dave@dest.test", "5.1.1", "550 5.1.1 unknown"))[0] \
        == 250
    wait_for_event(server, "feedback_unmatched")
    assert not events(server, "bounced", source="report")
    code, text = report(port, HOSTS["dest"], "", "postmaster@sender.test", b"Subject: x\r\n\r\nx\r\n")
    assert (code, text[:5]) == (554, b"5.7.1")


@pytest.mark.parametrize("source", [HOSTS["dest"], FORGER])
def test_a_complaint_to_the_feedback_address_is_matched_and_suppresses_when_trusted(world: World,
                                                                                   source: str) -> None:
    world.sink("dest")
    server, port = feedback_mta(world)
    erin = delivered_return_path(world, server, "erin@dest.test", 1)
    assert report(port, source, "fbl@dest.test", f"fbl@{DOMAIN}", arf(erin, "erin@dest.test"))[0] == 250
    [complaint] = wait_for_event(server, "complained", recipient="erin@dest.test")
    assert (complaint["feedback_type"], complaint["sending_domain"]) == ("abuse", "sender.test")
    assert complaint["trusted"] is (source == HOSTS["dest"])
    if source == HOSTS["dest"]:
        [added] = wait_for_event(server, "suppression_added", recipient="erin@dest.test")
        assert added["reason"] == "complaint"
    else:
        assert not events(server, "suppression_added", recipient="erin@dest.test")


SIGNER = Path(__file__).parent.parent / "tools" / "dkimsign.pl"


def test_a_dkim_signed_complaint_is_trusted_where_spf_fails_and_an_altered_one_is_not(world: World) -> None:
    key_path = world.dkim_key("fbl", "dest.test")
    world.sink("dest")
    server, port = feedback_mta(world)
    for n, name in enumerate(("frank", "grace")):
        path = delivered_return_path(world, server, f"{name}@dest.test", n + 1)
        signed = subprocess.run(["perl", str(SIGNER), "dest.test", "fbl", str(key_path)],
                                input=arf(path, f"{name}@dest.test"), capture_output=True, timeout=30, check=True)
        assert signed.stdout.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed; d=dest.test;")
        data = signed.stdout if name == "frank" else signed.stdout.replace(b"hello", b"HELLO")
        assert report(port, FORGER, "fbl@dest.test", f"fbl@{DOMAIN}", data)[0] == 250

    [frank] = wait_for_event(server, "complained", recipient="frank@dest.test")
    assert (frank["spf"], frank["dkim"], frank["trusted"]) == ("fail", "pass", True)
    [grace] = wait_for_event(server, "complained", recipient="grace@dest.test")
    assert (grace["spf"], grace["dkim"], grace["trusted"]) == ("fail", "fail", False)
    wait_for_event(server, "suppression_added", recipient="frank@dest.test", reason="complaint")
    assert not events(server, "suppression_added", recipient="grace@dest.test")
    kept = [path.read_bytes() for path in (Path(server.config["spool"]["path"]) / "feedback").glob("*.eml")]
    assert any(b"dkim=pass header.d=dest.test" in item.split(b"\r\n\r\n", 1)[0] for item in kept)


def test_reports_in_parallel_each_suppress_their_own_recipient(world: World) -> None:
    world.sink("dest")
    server, port = feedback_mta(world)
    recipients = [f"user{n}@dest.test" for n in range(8)]
    paths = [delivered_return_path(world, server, rcpt, n + 1) for n, rcpt in enumerate(recipients)]

    def send(pair: tuple[str, str]) -> int:
        path, rcpt = pair
        return report(port, HOSTS["dest"], "", path, dsn(path, rcpt, "5.1.1", f"550 5.1.1 <{rcpt}>: no such user"))[0]

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(send, zip(paths, recipients, strict=True))) == [250] * 8
    added = wait_for_event(server, "suppression_added", count=8, source="report")
    assert sorted(item["recipient"] for item in added) == sorted(recipients)
    assert len(list((Path(server.config["spool"]["path"]) / "feedback").glob("*.eml"))) == 8
