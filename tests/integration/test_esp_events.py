"""Providers' event webhooks to a real ``mta serve``: SendGrid, Mailgun, SES through SNS, Postmark.

Each provider is played by ``tests.fakes.esp_providers``: its documented JSON,
its headers and its proof made with real keys (ECDSA, HMAC, an RSA signing
certificate served over HTTPS, basic auth).  What is checked, through the
server's log, its metrics and real SMTP afterwards:

- a proven hard bounce suppresses the address (the next RCPT gets
  ``550 5.1.1``), a complaint suppresses, a reputation refusal does not;
- delivered, deferred and bounced events come out with ``source:
  esp:<provider>`` and their category;
- a forged signature, a stale timestamp, a replayed Mailgun token, an SNS
  certificate from a host not allowed, a topic not configured, missing or
  wrong basic auth are all 401 and act on nothing;
- an SNS subscription is confirmed by visiting its SubscribeURL; an SNS
  retry of the same message is taken once;
- parallel posts from all four providers each suppress their own address.
"""

from __future__ import annotations

import json
import smtplib
import ssl
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
import trustme
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.conftest import World
from tests.fakes.esp_providers import Mailgun, Postmark, SendGrid, Sns, mailgun_event, sendgrid_event
from tests.harness import HOST, MtaServer
from tests.obs.logs import events, wait_for_event
from tests.obs.scrape import scrape
from tests.peers.net import free_port

TOPIC = "arn:aws:sns:us-east-1:123456789012:ses-events"
# Gmail's documented refusal for low reputation (support.google.com/mail/answer/81126).
GMAIL_REPUTATION = ("550 5.7.1 Our system has detected that this message is likely suspicious due to the very "
                    "low reputation of the sending IP address.")
UNKNOWN_USER = ("550 5.1.1 The email account that you tried to reach does not exist. Please try double-checking "
                "the recipient's email address for typos or unnecessary spaces.")


@dataclass
class Providers:
    server: MtaServer
    url: str  # .../v1/events/
    sendgrid: SendGrid
    mailgun: Mailgun
    postmark: Postmark
    sns: Sns

    def at(self, provider: str) -> str:
        return self.url + provider


@pytest.fixture
def providers(world: World) -> Iterator[Providers]:
    ca = trustme.CA()
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(tls)
    sns = Sns(tls).start()
    world.others.append(sns)
    sendgrid, mailgun, postmark = SendGrid(), Mailgun(), Postmark()
    files = {"sendgrid.key": sendgrid.public_key_text, "mailgun.key": mailgun.key,
             "postmark.auth": f"{postmark.user}:{postmark.password}", "api-keys": ""}
    for name, text in files.items():
        (world.root / name).write_text(text + "\n")
        (world.root / name).chmod(0o600)
    ca.cert_pem.write_to_path(str(world.root / "sns-ca.pem"))
    api_port = free_port(HOST)
    server = world.mta({
        "listeners": [{"name": "relay", "address": f"{HOST}:{{port}}", "mode": "relay",
                       "trusted_networks": ["127.0.0.1/32"]}],
        "http_api": {"address": f"{HOST}:{api_port}", "keys_file": str(world.root / "api-keys")},
        "identity": {"sending_domains": ["app.test"]},
        "feedback": {"esp": {
            "sendgrid": {"public_key_file": str(world.root / "sendgrid.key")},
            "mailgun": {"signing_key_file": str(world.root / "mailgun.key")},
            "ses": {"topic_arns": [TOPIC], "cert_hosts": r"^127\.0\.0\.1$", "ca_file": str(world.root / "sns-ca.pem")},
            "postmark": {"credentials_file": str(world.root / "postmark.auth")},
        }},
    })
    yield Providers(server, f"http://{HOST}:{api_port}/v1/events/", sendgrid, mailgun, postmark, sns)


def rcpt(server: MtaServer, address: str) -> tuple[int, bytes]:
    with smtplib.SMTP(HOST, server.port, timeout=20) as client:
        client.ehlo("app.kubemta.test")
        client.mail("news@app.test")
        return client.rcpt(address)


def ses_bounce(address: str, bounce_type: str, subtype: str, status: str, diagnostic: str) -> str:
    # https://docs.aws.amazon.com/ses/latest/dg/notification-examples.html
    return json.dumps({
        "notificationType": "Bounce",
        "bounce": {"bounceType": bounce_type, "bounceSubType": subtype, "feedbackId": "0100abc-000000",
                   "timestamp": "2026-12-08T10:00:00.000Z", "reportingMTA": "dsn; a8-70.smtp-out.amazonses.com",
                   "bouncedRecipients": [{"emailAddress": address, "action": "failed", "status": status,
                                          "diagnosticCode": diagnostic}]},
        "mail": ses_mail(address)})


def ses_mail(address: str) -> dict[str, Any]:
    return {"timestamp": "2026-12-08T09:59:58.000Z", "source": "news@app.test",
            "sourceArn": "arn:aws:ses:us-east-1:123456789012:identity/app.test",
            "messageId": "0000014644fe5ef6-9a483358-9170-4cb4-a269-f5dcdf415321-000000",
            "destination": [address], "headersTruncated": False,
            "commonHeaders": {"from": ["App <news@app.test>"], "to": [address], "messageId": "<abc@app.test>",
                              "subject": "Hello"}}


def test_sendgrid_bounce_suppresses_blocked_does_not_and_forgeries_are_refused(providers: Providers) -> None:
    server, url = providers.server, providers.at("sendgrid")
    batch = [
        sendgrid_event("delivered", "ok@dest.test", response="250 2.0.0 OK 1700000000 a1si123 - gsmtp"),
        sendgrid_event("deferred", "slow@dest.test", response="421 4.7.0 Try again later", attempt="2"),
        sendgrid_event("bounce", "gone@gmail.test", status="5.1.1", type="bounce", reason=UNKNOWN_USER),
        sendgrid_event("bounce", "fine@gmail.test", status="5.7.1", type="blocked", reason=GMAIL_REPUTATION),
        sendgrid_event("spamreport", "angry@dest.test"),
        sendgrid_event("open", "ok@dest.test", useragent="Mozilla/5.0"),
    ]
    assert providers.sendgrid.post(url, batch) == (200, {"events": 6})
    [bounce] = wait_for_event(server, "bounced", source="esp:sendgrid", recipient="gone@gmail.test")
    assert (bounce["category"], bounce["provider"], bounce["message_id"]) == (
        "invalid_recipient", "sendgrid", batch[2]["smtp-id"])
    [blocked] = wait_for_event(server, "bounced", source="esp:sendgrid", recipient="fine@gmail.test")
    assert blocked["category"] == "reputation"
    [deferred] = wait_for_event(server, "deferred", source="esp:sendgrid", recipient="slow@dest.test")
    assert deferred["reply"].startswith("421 4.7.0")
    wait_for_event(server, "delivered", source="esp:sendgrid", recipient="ok@dest.test")
    wait_for_event(server, "complained", source="esp:sendgrid", recipient="angry@dest.test")
    wait_for_event(server, "suppression_added", source="esp:sendgrid", recipient="angry@dest.test",
                   reason="complaint")
    wait_for_event(server, "suppression_added", source="esp:sendgrid", recipient="gone@gmail.test",
                   reason="invalid_recipient")
    code, text = rcpt(server, "gone@gmail.test")
    assert (code, text[:5]) == (550, b"5.1.1") and b"suppression list" in text
    assert rcpt(server, "angry@dest.test")[0] == 550
    assert rcpt(server, "fine@gmail.test")[0] == 250  # a reputation refusal says nothing about the address

    other_key = ec.generate_private_key(ec.SECP256R1())
    forged = [sendgrid_event("bounce", "victim@dest.test", status="5.1.1", reason=UNKNOWN_USER)]
    assert providers.sendgrid.post(url, forged, key=other_key)[0] == 401
    assert providers.sendgrid.post(url, forged, timestamp=int(time.time()) - 3600)[0] == 401  # a replay, later
    refused = wait_for_event(server, "esp_request_refused", provider="sendgrid", count=2)
    assert "does not verify" in refused[0]["reason"] and "old" in refused[1]["reason"]
    assert rcpt(server, "victim@dest.test")[0] == 250
    assert not events(server, "bounced", recipient="victim@dest.test")

    metrics = scrape(server)
    assert metrics.get("kubemta_esp_events_total", provider="sendgrid", kind="bounced") == 2
    assert metrics.get("kubemta_esp_events_total", provider="sendgrid", kind="refused") == 2
    assert metrics.get("kubemta_esp_events_total", provider="sendgrid", kind="ignored") == 1
    # ESP news about mail delivered earlier is not a second delivery outcome.
    assert metrics.get("kubemta_delivery_outcomes_total", domain="other", outcome="delivered") == 0


def test_mailgun_permanent_failure_suppresses_temporary_defers_and_a_replay_is_refused(
        providers: Providers) -> None:
    server, url, mailgun = providers.server, providers.at("mailgun"), providers.mailgun
    failed = mailgun_event("failed", "nobody@dest.test", severity="permanent", reason="bounce",
                           **{"delivery-status": {"code": 550, "message": "5.1.1 <nobody@dest.test>: Recipient "
                                                  "address rejected: User unknown in virtual mailbox table",
                                                  "description": "", "attempt-no": 1, "tls": True}})
    signature = mailgun.signature()
    assert mailgun.post(url, failed, signature) == (200, {"events": 1})
    assert mailgun.post(url, failed, signature)[0] == 401  # the same token again
    temporary = mailgun_event("failed", "later@dest.test", severity="temporary", reason="generic",
                              **{"delivery-status": {"code": 452, "message": "4.2.2 Mailbox full",
                                                     "attempt-no": 1}})
    assert mailgun.post(url, temporary)[0] == 200
    assert mailgun.post(url, mailgun_event("complained", "spam@dest.test"))[0] == 200
    assert mailgun.post(url, mailgun_event("complained", "x@dest.test"), mailgun.signature(key="key-wrong"))[0] \
        == 401

    [bounce] = wait_for_event(server, "bounced", source="esp:mailgun", recipient="nobody@dest.test")
    assert (bounce["category"], bounce["sending_domain"], bounce["reply"][:9]) == (
        "invalid_recipient", "app.test", "550 5.1.1")
    [deferred] = wait_for_event(server, "deferred", source="esp:mailgun", recipient="later@dest.test")
    assert deferred["category"] == "mailbox_full"
    wait_for_event(server, "suppression_added", source="esp:mailgun", recipient="spam@dest.test")
    wait_for_event(server, "suppression_added", source="esp:mailgun", recipient="nobody@dest.test")
    assert len(events(server, "bounced", recipient="nobody@dest.test")) == 1
    assert rcpt(server, "nobody@dest.test")[0] == 550 and rcpt(server, "spam@dest.test")[0] == 550
    assert rcpt(server, "later@dest.test")[0] == 250 and rcpt(server, "x@dest.test")[0] == 250
    metrics = scrape(server)
    assert metrics.get("kubemta_complaints_total", sending_domain="app.test", trusted="true") == 1
    assert metrics.get("kubemta_sending_domain_bounces_total", sending_domain="app.test",
                       category="invalid_recipient") == 1


def test_ses_through_sns_confirms_its_subscription_and_takes_only_signed_messages(providers: Providers) -> None:
    server, url, sns = providers.server, providers.at("ses"), providers.sns
    confirmation = sns.message(TOPIC, "SubscriptionConfirmation", "You have chosen to subscribe to the topic.")
    assert sns.post(url, confirmation)[0] == 200
    wait_for_event(server, "esp_subscription_confirmed", topic=TOPIC)
    assert sns.confirmed == [confirmation["Token"]]

    bounce = sns.message(TOPIC, "Notification", ses_bounce("ghost@dest.test", "Permanent", "General", "5.1.1",
                                                           "smtp; 550 5.1.1 user unknown"))
    assert sns.post(url, bounce) == (200, {"events": 1})
    assert sns.post(url, bounce) == (200, {"events": 0})  # SNS retrying the same message: taken once
    complaint = sns.message(TOPIC, "Notification", json.dumps({
        "notificationType": "Complaint", "mail": ses_mail("hater@dest.test"),
        "complaint": {"userAgent": "AnyCompany Feedback Loop (V0.01)", "complaintFeedbackType": "abuse",
                      "complainedRecipients": [{"emailAddress": "hater@dest.test"}],
                      "timestamp": "2026-12-08T10:01:00.000Z", "feedbackId": "0100abc-000001"}}), version="2")
    assert sns.post(url, complaint)[0] == 200
    full = sns.message(TOPIC, "Notification", ses_bounce("full@dest.test", "Transient", "MailboxFull", "4.2.2",
                                                         "smtp; 452 4.2.2 mailbox full"))
    assert sns.post(url, full)[0] == 200

    [bounced] = wait_for_event(server, "bounced", source="esp:ses", recipient="ghost@dest.test")
    assert (bounced["category"], bounced["esp_event"], bounced["message_id"]) == (
        "invalid_recipient", "Bounce/General", "<abc@app.test>")
    [complained] = wait_for_event(server, "complained", source="esp:ses", recipient="hater@dest.test")
    assert complained["sending_domain"] == "app.test" and complained["trusted"] is True
    [soft] = wait_for_event(server, "bounced", source="esp:ses", recipient="full@dest.test")
    assert soft["category"] == "mailbox_full"
    assert rcpt(server, "ghost@dest.test")[0] == 550 and rcpt(server, "hater@dest.test")[0] == 550
    assert rcpt(server, "full@dest.test")[0] == 250

    forger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    victim = ses_bounce("victim@dest.test", "Permanent", "General", "5.1.1", "smtp; 550 5.1.1 user unknown")
    attempts = [
        sns.message(TOPIC, "Notification", victim, key=forger),  # not signed by the certificate's key
        sns.message(TOPIC, "Notification", victim, cert_url="https://127.0.0.2:1/forger.pem", key=forger),
        sns.message(TOPIC, "Notification", victim, cert_url=sns.cert_url.replace("https:", "http:")),
        sns.message("arn:aws:sns:us-east-1:999999999999:other", "Notification", victim),
    ]
    assert [sns.post(url, message)[0] for message in attempts] == [401, 401, 401, 401]
    reasons = [item["reason"] for item in wait_for_event(server, "esp_request_refused", provider="ses", count=4)]
    assert "does not verify" in reasons[0] and "cert_hosts" in reasons[1] and "cert_hosts" in reasons[2]
    assert "topic_arns" in reasons[3]
    tampered = sns.message(TOPIC, "Notification", victim)
    tampered["Message"] = tampered["Message"].replace("victim@", "other@")
    assert sns.post(url, tampered)[0] == 401
    assert rcpt(server, "victim@dest.test")[0] == 250 and rcpt(server, "other@dest.test")[0] == 250
    assert sns.fetched == 1  # the certificate is fetched once, and never from a host not allowed

    # An allowed host whose certificate cannot be fetched: 503, so that SNS posts it again later.
    gone = sns.message(TOPIC, "Notification", victim, cert_url=f"https://127.0.0.1:{free_port()}/cert.pem")
    status, body = sns.post(url, gone)
    assert (status, body["error"]["code"]) == (503, "certificate_unavailable")
    assert rcpt(server, "victim@dest.test")[0] == 250


def test_postmark_needs_its_basic_auth_and_maps_bounce_types(providers: Providers) -> None:
    server, url, postmark = providers.server, providers.at("postmark"), providers.postmark
    hard = {"RecordType": "Bounce", "MessageStream": "outbound", "ID": 4323372036854775807, "Type": "HardBounce",
            "TypeCode": 1, "Name": "Hard bounce", "Tag": "Invitation",
            "MessageID": "883953f4-6105-42a2-a16a-77a8eac79483", "Metadata": {}, "ServerID": 23,
            "Description": "The server was unable to deliver your message (ex: unknown user, mailbox not found).",
            "Details": "smtp;550 5.1.1 The email account that you tried to reach does not exist",
            "Email": "lost@dest.test", "From": "news@app.test", "BouncedAt": "2026-12-08T10:00:00Z",
            "DumpAvailable": True, "Inactive": True, "CanActivate": True, "Subject": "Hello"}
    assert postmark.post(url, {**hard, "Email": "intruder@dest.test"}, password="")[0] == 401
    assert postmark.post(url, {**hard, "Email": "intruder@dest.test"}, password="guess")[0] == 401
    assert postmark.post(url, hard) == (200, {"events": 1})
    dns_error = {**hard, "Type": "DnsError", "TypeCode": 64, "Details": "DNS lookup failed",
                 "Email": "x@no-such-domain.test"}
    assert postmark.post(url, dns_error)[0] == 200
    complaint = {"RecordType": "SpamComplaint", "MessageStream": "outbound", "ID": 42, "Type": "SpamComplaint",
                 "TypeCode": 512, "MessageID": "00000000-0000-0000-0000-000000000000", "ServerID": 1234,
                 "Email": "upset@dest.test", "From": "news@app.test", "BouncedAt": "2026-12-08T10:01:00Z"}
    assert postmark.post(url, complaint)[0] == 200
    delivery = {"RecordType": "Delivery", "ServerID": 23, "MessageStream": "outbound",
                "MessageID": "883953f4-6105-42a2-a16a-77a8eac79484", "Recipient": "happy@dest.test",
                "DeliveredAt": "2026-12-08T10:02:00Z", "Details": "Test delivery webhook details", "Metadata": {}}
    assert postmark.post(url, delivery)[0] == 200

    [lost] = wait_for_event(server, "bounced", source="esp:postmark", recipient="lost@dest.test")
    assert (lost["category"], lost["reply"][:9]) == ("invalid_recipient", "550 5.1.1")
    [domain] = wait_for_event(server, "bounced", source="esp:postmark", recipient="x@no-such-domain.test")
    assert domain["category"] == "invalid_domain" and "DNS lookup failed" in domain["reply"]
    wait_for_event(server, "complained", source="esp:postmark", recipient="upset@dest.test")
    wait_for_event(server, "delivered", source="esp:postmark", recipient="happy@dest.test")
    wait_for_event(server, "esp_request_refused", provider="postmark", count=2)
    assert rcpt(server, "lost@dest.test")[0] == 550 and rcpt(server, "upset@dest.test")[0] == 550
    assert rcpt(server, "intruder@dest.test")[0] == 250
    assert not events(server, "bounced", recipient="intruder@dest.test")


def test_bad_requests_get_clear_errors(providers: Providers) -> None:
    url = providers.at("sendgrid")
    status, body = providers.postmark.post(providers.at("sparkpost"), {})
    assert status == 404 and "sendgrid, mailgun, ses, postmark" in body["error"]["message"]
    assert providers.sendgrid.post(url, {"event": "bounce"})[0] == 400  # SendGrid posts an array  # type: ignore[arg-type]
    assert providers.postmark.post(providers.at("postmark"), {"RecordType": "Bounce", "Type": "HardBounce"})[0] \
        == 400  # no Email


def test_a_large_batch_is_read_whole_and_an_oversized_one_refused(providers: Providers) -> None:
    url = providers.at("sendgrid")
    batch = [sendgrid_event("open", f"reader{n}@dest.test", useragent="Mozilla/5.0 " + "x" * 200)
             for n in range(3000)]
    batch.append(sendgrid_event("bounce", "last@dest.test", status="5.1.1", reason=UNKNOWN_USER))
    assert len(json.dumps(batch)) > 1_000_000
    assert providers.sendgrid.post(url, batch) == (200, {"events": 3001})
    wait_for_event(providers.server, "suppression_added", recipient="last@dest.test")
    huge = [sendgrid_event("open", "x@dest.test", useragent="y" * 9_000_000)]
    status, body = providers.sendgrid.post(url, huge)
    assert status == 413 and body["error"]["code"] == "request_too_large"


def test_parallel_posts_from_every_provider_each_suppress_their_own_address(providers: Providers) -> None:
    server = providers.server

    def one(n: int) -> int:
        address = f"p{n}@dest.test"
        kind = n % 4
        if kind == 0:
            return providers.sendgrid.post(providers.at("sendgrid"), [sendgrid_event(
                "bounce", address, status="5.1.1", reason=UNKNOWN_USER)])[0]
        if kind == 1:
            status = {"delivery-status": {"code": 550, "message": UNKNOWN_USER}}
            return providers.mailgun.post(providers.at("mailgun"), mailgun_event(
                "failed", address, severity="permanent", **status))[0]
        if kind == 2:
            return providers.sns.post(providers.at("ses"), providers.sns.message(TOPIC, "Notification", ses_bounce(
                address, "Permanent", "NoEmail", "5.1.1", "smtp; 550 5.1.1 user unknown")))[0]
        return providers.postmark.post(providers.at("postmark"), {
            "RecordType": "Bounce", "Type": "HardBounce", "TypeCode": 1, "Email": address, "From": "news@app.test",
            "Details": "smtp;550 5.1.1 unknown user", "MessageID": f"id-{n}"})[0]

    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(one, range(32))) == [200] * 32
    wait_for_event(server, "suppression_added", count=32, reason="invalid_recipient")
    for first in range(0, 32, 8):  # refused recipients count as errors: max_errors (10) per session
        with smtplib.SMTP(HOST, server.port, timeout=20) as client:
            client.ehlo("app.kubemta.test")
            client.mail("news@app.test")
            assert {client.rcpt(f"p{n}@dest.test")[0] for n in range(first, first + 8)} == {550}


def test_bad_key_files_are_named_by_check_config_and_stop_serve(world: World) -> None:
    (world.root / "not-a-key").write_text("-----BEGIN PUBLIC KEY-----\nnonsense\n-----END PUBLIC KEY-----\n")
    (world.root / "token-only").write_text("0123456789abcdef\n")
    (world.root / "api-keys").write_text("")
    for name in ("not-a-key", "token-only", "api-keys"):
        (world.root / name).chmod(0o600)
    server = world.mta({
        "http_api": {"address": f"{HOST}:{free_port(HOST)}", "keys_file": str(world.root / "api-keys")},
        "feedback": {"esp": {"sendgrid": {"public_key_file": str(world.root / "not-a-key")},
                             "postmark": {"credentials_file": str(world.root / "token-only")}}},
    }, start=False)
    done = server.cli("check-config")
    assert done.returncode != 0
    assert "feedback.esp.sendgrid.public_key_file: not an ECDSA public key" in done.stderr, done.stderr
    done = server.cli("serve")
    assert done.returncode == 1 and "feedback.esp.sendgrid.public_key_file: not an ECDSA public key" in done.stderr
    server.config["feedback"]["esp"].pop("sendgrid")
    server.config_path.write_text(json.dumps(server.config))
    done = server.cli("check-config")
    assert "feedback.esp.postmark.credentials_file: the first line must be user:password" in done.stderr
