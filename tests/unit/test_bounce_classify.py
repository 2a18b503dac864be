"""Bounce categories from the reply texts the large providers document, and rules from the config."""

from __future__ import annotations

import pytest

from mta import config, replies
from mta.bounce.classify import ADDRESS_CATEGORIES, Category, Classifier

CLASSIFIER = Classifier()

# (reply as it arrives, category): providers' documented wording first, then generic servers.
CASES = [
    # Gmail, https://support.google.com/a/answer/3726730
    ("550 5.1.1 The email account that you tried to reach does not exist. Please try double-checking the "
     "recipient's email address for typos or unnecessary spaces. - gsmtp", Category.INVALID_RECIPIENT),
    ("550 5.7.1 Our system has detected that this message is likely suspicious due to the very low "
     "reputation of the sending IP address. To best protect our users from spam, the message has been "
     "blocked. - gsmtp", Category.REPUTATION),
    ("550 5.7.1 Our system has detected that this message is likely unsolicited mail. To reduce the amount "
     "of spam sent to Gmail, this message has been blocked. - gsmtp", Category.CONTENT_REJECTED),
    ("421 4.7.0 Our system has detected an unusual rate of unsolicited mail originating from your IP "
     "address. To protect our users from spam, mail sent from your IP address has been temporarily "
     "blocked. - gsmtp", Category.REPUTATION),
    ("550 5.7.26 This mail has been blocked because the sender is unauthenticated. Gmail requires all "
     "senders to authenticate with either SPF or DKIM. - gsmtp", Category.POLICY),
    ("452 4.2.2 The email account that you tried to reach is over quota. - gsmtp", Category.MAILBOX_FULL),
    ("552 5.3.4 Your message exceeded Google's message size limits. - gsmtp", Category.MESSAGE_TOO_LARGE),
    ("421 4.7.0 TLS required for RCPT domain, closing connection. - gsmtp", Category.TLS),
    # Microsoft
    ("550 5.7.1 Unfortunately, messages from [192.0.2.25] weren't sent. Please contact your Internet "
     "service provider since part of their network is on our block list (S3150). You can also refer your "
     "provider to http://mail.live.com/mail/troubleshooting.aspx#errors.", Category.REPUTATION),
    ("550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
     Category.INVALID_RECIPIENT),
    ("550 5.4.1 Recipient address rejected: Access denied. AS(201806281)", Category.INVALID_RECIPIENT),
    ("451 4.7.650 The mail server [192.0.2.25] has been temporarily rate limited due to IP reputation.",
     Category.REPUTATION),
    # Yahoo, https://senders.yahooinc.com/smtp-error-codes/
    ("421 4.7.0 [TSS04] Messages from 192.0.2.25 temporarily deferred due to unexpected volume or user "
     "complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes", Category.REPUTATION),
    ("554 5.7.9 Message not accepted for policy reasons.  See https://postmaster.yahooinc.com/error-codes",
     Category.CONTENT_REJECTED),
    ("552 1 Requested mail action aborted, mailbox not found", Category.INVALID_RECIPIENT),
    # Apple iCloud, https://support.apple.com/en-us/102322
    ("550 5.1.1 <someone@icloud.com>: user does not exist", Category.INVALID_RECIPIENT),
    ("421 4.7.1 Messages to someone@icloud.com deferred due to excessive volume. Try again later",
     Category.REPUTATION),
    ("550 5.7.1 [CS01] Message rejected due to local policy. Please visit https://support.apple.com/en-us/102322",
     Category.CONTENT_REJECTED),
    # Generic servers and our own wording
    ("550 5.1.1 <nobody@dest.test>: Recipient address rejected: User unknown in virtual mailbox table",
     Category.INVALID_RECIPIENT),
    ("554 5.7.1 Service unavailable; Client host [192.0.2.25] blocked using zen.spamhaus.org",
     Category.REPUTATION),
    ("550 5.1.2 domain nowhere.test does not exist", Category.INVALID_DOMAIN),
    ("451 4.4.1 cannot connect to mx.dest.test[192.0.2.1]: Connection refused", Category.ROUTING),
    ("451 4.3.0 local error during delivery", Category.TRANSIENT),
    ("550 no reason given", Category.OTHER),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_documented_replies_get_their_category(text: str, expected: Category) -> None:
    reply = replies.parse(text)
    assert reply is not None
    assert CLASSIFIER.classify(reply) is expected


def test_only_dead_addresses_may_suppress() -> None:
    assert {Category.INVALID_RECIPIENT, Category.INVALID_DOMAIN} == ADDRESS_CATEGORIES
    assert Category.REPUTATION not in ADDRESS_CATEGORIES and Category.POLICY not in ADDRESS_CATEGORIES


def test_config_rules_come_first_and_every_part_must_match() -> None:
    loaded = config.load(None, {
        "MTA__BOUNCES__RULES__0__CATEGORY": "reputation",
        "MTA__BOUNCES__RULES__0__CODE": "550",
        "MTA__BOUNCES__RULES__0__TEXT": "no such user here \\(warm-up\\)",
    })
    classifier = loaded.bounces.classifier()
    assert classifier.classify(replies.Reply(550, "5.1.1", "no such user here (warm-up)")) is Category.REPUTATION
    # The code differs: the built-in rules decide.
    assert classifier.classify(replies.Reply(551, "5.1.1", "no such user here (warm-up)")) is \
        Category.INVALID_RECIPIENT


@pytest.mark.parametrize(("env", "message"), [
    ({"MTA__BOUNCES__RULES__0__CATEGORY": "hard", "MTA__BOUNCES__RULES__0__CODE": "550"},
     "bounces.rules.0.category: 'hard' is not one of"),
    ({"MTA__BOUNCES__RULES__0__CATEGORY": "policy", "MTA__BOUNCES__RULES__0__TEXT": "(unclosed"},
     "bounces.rules.0.text: '(unclosed' is not a regular expression"),
    ({"MTA__BOUNCES__RULES__0__CATEGORY": "policy"}, "a rule needs at least one of enhanced, code, text"),
    ({"MTA__SUPPRESSION__EXPIRY__COMPLAINT": "soon"}, "suppression.expiry.complaint"),
    ({"MTA__SUPPRESSION__ACTION": "drop"}, "suppression.action"),
])
def test_bad_rules_and_settings_name_their_key(env: dict[str, str], message: str) -> None:
    with pytest.raises(config.ConfigError, match=None) as caught:
        config.load(None, env)
    assert message in str(caught.value)
