"""Providers' event payloads, read as their documentation shows them, and the proofs checked offline."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mta.bounce.classify import Category, Classifier
from mta.feedback import esp
from mta.feedback.esp_auth import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    BasicAuth,
    Forged,
    MailgunSignature,
    SendgridSignature,
    sns_string_to_sign,
)

NOW = 1_765_000_000.0


def test_sendgrid_documented_batch_maps_every_event_kind() -> None:
    # The shape of https://www.twilio.com/docs/sendgrid/for-developers/tracking-events/event#events
    batch = [
        {"email": "a@example.com", "timestamp": 1513299569, "smtp-id": "<14c5d75ce93.dfd.64b469@ismtpd-555>",
         "event": "processed", "category": "cat facts", "sg_event_id": "rbtnWrG1DVDGGGFHFyun0A==",
         "sg_message_id": "14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.000000000000000000000"},
        {"email": "b@example.com", "event": "dropped", "reason": "Bounced Address", "status": "5.0.0"},
        {"email": "c@example.com", "event": "delivered", "response": "250 OK"},
        {"email": "d@example.com", "event": "deferred", "response": "400 try again later", "attempt": "5"},
        {"email": "e@example.com", "event": "bounce", "reason": "500 unknown recipient", "status": "5.0.0",
         "type": "bounce"},
        {"email": "f@example.com", "event": "spamreport"},
        {"email": "g@example.com", "event": "unsubscribe"},
    ]
    news = esp.sendgrid(batch)
    assert [n.kind for n in news] == ["ignored", "bounced", "delivered", "deferred", "bounced", "complained",
                                      "ignored"]
    assert news[0].message_id == "<14c5d75ce93.dfd.64b469@ismtpd-555>"
    assert str(news[1].reply) == "550 5.0.0 dropped by SendGrid: Bounced Address"
    assert (news[3].reply.code, news[3].reply.enhanced) == (400, "4.0.0")
    assert (news[4].reply.code, news[4].reply.text) == (500, "unknown recipient")


def test_mailgun_suppress_bounce_with_a_non_smtp_code() -> None:
    # The "failed" example of Mailgun's webhook documentation: code 605 is Mailgun's own, not SMTP.
    document = {"signature": {}, "event-data": {
        "event": "failed", "id": "G9Bn5sl1TC6nu79C8C0bwg", "severity": "permanent", "reason": "suppress-bounce",
        "recipient": "alice@example.com",
        "message": {"headers": {"to": "Alice <alice@example.com>", "message-id": "20130503192659.13651@mg.example",
                                "from": "Bob <bob@sending.example>", "subject": "Test permanent_fail webhook"}},
        "delivery-status": {"attempt-no": 1, "message": "", "code": 605,
                            "description": "Not delivering to previously bounced address",
                            "session-seconds": 0.0}}}
    [news] = esp.mailgun(document)
    assert (news.kind, news.recipient, news.sending_domain) == ("bounced", "alice@example.com", "sending.example")
    assert (news.reply.code, news.reply.enhanced, news.reply.text) == (
        550, "5.0.0", "Not delivering to previously bounced address")


def test_ses_event_publishing_form_and_delays() -> None:
    mail = {"messageId": "ses-1", "source": "news@sending.example", "commonHeaders": {"messageId": "<m@x>"}}
    bounce = {"eventType": "Bounce", "mail": mail, "bounce": {
        "bounceType": "Permanent", "bounceSubType": "NoEmail",
        "bouncedRecipients": [{"emailAddress": "x@example.com"}]}}
    [news] = esp.ses(bounce)
    assert (news.kind, news.event, news.sending_domain) == ("bounced", "Bounce/NoEmail", "sending.example")
    assert Classifier().classify(news.reply) is Category.INVALID_RECIPIENT  # the subtype stands for a reply
    delay = {"eventType": "DeliveryDelay", "mail": mail, "deliveryDelay": {
        "delayType": "TransientCommunicationFailure", "expirationTime": "2026-12-09T00:00:00Z",
        "delayedRecipients": [{"emailAddress": "y@example.com", "status": "4.4.1",
                               "diagnosticCode": "smtp; 421 4.4.1 Unable to connect"}]}}
    [later] = esp.ses(delay)
    assert (later.kind, later.reply.code, later.reply.enhanced) == ("deferred", 421, "4.4.1")
    assert esp.ses({"eventType": "Open", "mail": mail})[0].kind == "ignored"
    with pytest.raises(ValueError, match="bouncedRecipients"):
        esp.ses({"notificationType": "Bounce", "bounce": {"bounceType": "Permanent"}})


def test_postmark_bounce_types() -> None:
    def one(bounce_type: str, details: str = "") -> esp.News:
        [news] = esp.postmark({"RecordType": "Bounce", "Type": bounce_type, "Email": "z@example.com",
                               "Details": details, "From": "a@sending.example"})
        return news

    classify = Classifier().classify
    assert classify(one("HardBounce", "Test bounce details").reply) is Category.INVALID_RECIPIENT
    assert classify(one("BadEmailAddress").reply) is Category.INVALID_RECIPIENT
    assert classify(one("DnsError").reply) is Category.INVALID_DOMAIN
    soft = one("SoftBounce", "smtp;452 4.2.2 The email account that you tried to reach is over quota")
    assert (soft.kind, classify(soft.reply)) == ("bounced", Category.MAILBOX_FULL)
    assert one("AutoResponder").kind == "ignored"


def test_sns_string_to_sign_takes_the_keys_in_order_and_subject_only_when_present() -> None:
    message = {"Type": "Notification", "MessageId": "m1", "TopicArn": "arn:aws:sns:us-east-1:123456789012:t",
               "Message": "hello", "Timestamp": "2026-12-08T10:00:00.000Z", "SignatureVersion": "1",
               "Signature": "x", "SigningCertURL": "https://sns.us-east-1.amazonaws.com/c.pem"}
    assert sns_string_to_sign(message) == (b"Message\nhello\nMessageId\nm1\nTimestamp\n2026-12-08T10:00:00.000Z\n"
                                           b"TopicArn\narn:aws:sns:us-east-1:123456789012:t\nType\nNotification\n")
    with_subject = sns_string_to_sign({**message, "Subject": "s"})
    assert b"MessageId\nm1\nSubject\ns\nTimestamp" in with_subject
    with pytest.raises(Forged):
        sns_string_to_sign({**message, "Type": "Other"})


def test_sendgrid_key_forms_and_signature(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    der = base64.b64encode(public.public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo))
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    body = json.dumps([{"email": "a@example.com", "event": "delivered"}]).encode()
    stamp = str(int(NOW))
    headers = {SIGNATURE_HEADER: base64.b64encode(key.sign(stamp.encode() + body, ec.ECDSA(hashes.SHA256())))
               .decode(), TIMESTAMP_HEADER: stamp}
    for text in (der, pem):
        checker = SendgridSignature(text, 600, clock=lambda: NOW)
        checker.check(headers, body)
        with pytest.raises(Forged, match="does not verify"):
            checker.check(headers, body + b" ")
    with pytest.raises(Forged, match="old"):
        SendgridSignature(der, 600, clock=lambda: NOW + 601).check(headers, body)
    with pytest.raises(ValueError, match="not an ECDSA public key"):
        SendgridSignature(b"not a key", 600)


def test_mailgun_signature_replay_is_refused_only_once_acted_on() -> None:
    key = b"key-0123"
    stamp, token = str(int(NOW)), "t" * 50
    signature = {"timestamp": stamp, "token": token,
                 "signature": hmac.new(key, (stamp + token).encode(), hashlib.sha256).hexdigest()}
    checker = MailgunSignature(key, 600, clock=lambda: NOW)
    assert checker.check({"signature": signature}) == token
    assert checker.check({"signature": signature}) == token  # not acted on yet: a retry is taken
    checker.tokens.add(token)
    with pytest.raises(Forged, match="replay"):
        checker.check({"signature": signature})
    with pytest.raises(Forged, match="does not match"):
        checker.check({"signature": {**signature, "token": "u" * 50}})


def test_basic_auth() -> None:
    auth = BasicAuth("postmark:s3cret\n")
    auth.check({"Authorization": "Basic " + base64.b64encode(b"postmark:s3cret").decode()})
    for header in ({}, {"Authorization": "Basic " + base64.b64encode(b"postmark:guess").decode()},
                   {"Authorization": "Bearer s3cret"}):
        with pytest.raises(Forged):
            auth.check(header)
    with pytest.raises(ValueError, match="user:password"):
        BasicAuth("only-a-token")
