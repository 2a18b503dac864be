"""What an email service provider's event webhook says, one ``News`` per recipient event.

Mail relayed through a smart host (``routes[].provider``) is delivered,
bounced or complained about at the provider, which tells kubemta by
posting events.  Each reader takes one provider's documented JSON and
returns what kubemta acts on (``mta.feedback.actions``):

- **SendGrid** (Event Webhook: a JSON array): ``delivered``, ``deferred``,
  ``bounce`` (``type`` bounce or blocked), ``dropped``, ``spamreport``;
- **Mailgun** (webhooks, ``event-data``): ``delivered``, ``failed``
  (``severity`` permanent or temporary), ``complained``;
- **Amazon SES** (the notification inside an SNS message, both the
  notification and the event-publishing form): ``Delivery``, ``Bounce``,
  ``Complaint``, ``DeliveryDelay``;
- **Postmark** (``RecordType``): ``Delivery``, ``Bounce`` (by ``Type``),
  ``SpamComplaint``.

Every other event (opens, clicks, sends, unsubscribes) is ``ignored``: it
says nothing of an address.  A bounce's reply is the receiver's, from the
provider's diagnostic when it carries an SMTP reply; otherwise the
provider's own bounce type stands for one (``HardBounce`` is ``550 5.1.1``).

Nothing here checks who posted the event (``mta.feedback.esp_auth``) or
touches the network.  Failure: ``ValueError`` naming the field at fault
for a payload that is not the provider's shape (the endpoint answers 400).
"""

from __future__ import annotations

import email.utils
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mta.feedback.reports import diagnostic_reply
from mta.replies import Reply

DELIVERED, BOUNCED, DEFERRED, COMPLAINED, IGNORED = "delivered", "bounced", "deferred", "complained", "ignored"


@dataclass(frozen=True)
class News:
    kind: str  # delivered | bounced | deferred | complained | ignored
    recipient: str | None
    event: str  # the provider's name for it, for the log
    reply: Reply | None = None  # for delivered, bounced and deferred
    feedback_type: str | None = None  # for complained
    message_id: str | None = None  # the Message-ID header, as the provider saw it
    provider_id: str | None = None  # the provider's own id for the message
    sending_domain: str | None = None  # the original From's domain, where the event names it


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: a JSON object is expected")
    return value


def _text(value: Any) -> str | None:
    return str(value) if isinstance(value, str | int | float) and not isinstance(value, bool) and str(value) \
        else None


def _domain(address: Any) -> str | None:
    """The domain of an address or a From value ("Name <a@b>"), lower-cased."""
    text = _text(address)
    if text is None:
        return None
    parsed = email.utils.parseaddr(text)[1]
    if "@" not in parsed:
        return None
    return parsed.rpartition("@")[2].lower() or None


def _recipient(value: Any, where: str) -> str:
    text = _text(value)
    if text is None or "@" not in text:
        raise ValueError(f"{where}: an email address is expected")
    return email.utils.parseaddr(text)[1] or text


def _smtp(code: Any, text: str, enhanced: str, permanent: bool) -> Reply:
    """A reply from a code the provider reports (perhaps not an SMTP one: Mailgun's 605) and a text."""
    code_text = str(code) if isinstance(code, int) and 200 <= code < 600 else ""
    return diagnostic_reply(enhanced, f"{code_text} {text}".strip(), permanent)


# -- SendGrid: https://www.twilio.com/docs/sendgrid/for-developers/tracking-events/event -------------------


def sendgrid(document: Any) -> list[News]:
    if not isinstance(document, list):
        raise ValueError("the body: SendGrid posts a JSON array of events")
    news = []
    for n, item in enumerate(document):
        item = _object(item, f"[{n}]")
        name = _text(item.get("event")) or ""
        ids = {"message_id": _text(item.get("smtp-id")), "provider_id": _text(item.get("sg_message_id"))}
        if name not in ("delivered", "deferred", "bounce", "dropped", "spamreport"):
            news.append(News(IGNORED, _text(item.get("email")), name, **ids))
            continue
        recipient = _recipient(item.get("email"), f"[{n}].email")
        status = _text(item.get("status")) or ""
        if name == "delivered":
            news.append(News(DELIVERED, recipient, name, diagnostic_reply(status or "2.0.0",
                             _text(item.get("response")) or "250 delivered", False), **ids))
        elif name == "deferred":
            news.append(News(DEFERRED, recipient, name, diagnostic_reply(status, _text(item.get("response"))
                             or _text(item.get("reason")) or "deferred", False), **ids))
        elif name == "bounce":
            news.append(News(BOUNCED, recipient, name, diagnostic_reply(status, _text(item.get("reason"))
                             or _text(item.get("type")) or "bounced", True), **ids))
        elif name == "dropped":
            # SendGrid did not try: its own suppression list, or an address it found invalid.
            reason = _text(item.get("reason")) or "dropped"
            news.append(News(BOUNCED, recipient, name, Reply(550, "5.0.0", f"dropped by SendGrid: {reason}"),
                             **ids))
        else:
            news.append(News(COMPLAINED, recipient, name, feedback_type="abuse", **ids))
    return news


# -- Mailgun: https://documentation.mailgun.com/docs/mailgun/user-manual/events/webhooks ----------------


def mailgun(document: Any) -> list[News]:
    data = _object(_object(document, "the body").get("event-data"), "event-data")
    name = _text(data.get("event")) or ""
    message = data.get("message") if isinstance(data.get("message"), dict) else {}
    headers = message.get("headers") if isinstance(message.get("headers"), dict) else {}
    ids = {"message_id": _text(headers.get("message-id")), "provider_id": _text(data.get("id")),
           "sending_domain": _domain(headers.get("from"))}
    if name not in ("delivered", "failed", "complained"):
        return [News(IGNORED, _text(data.get("recipient")), name, **ids)]
    recipient = _recipient(data.get("recipient"), "event-data.recipient")
    if name == "complained":
        return [News(COMPLAINED, recipient, name, feedback_type="abuse", **ids)]
    status = data.get("delivery-status") if isinstance(data.get("delivery-status"), dict) else {}
    text = _text(status.get("message")) or _text(status.get("description")) or _text(data.get("reason")) or name
    enhanced = _text(status.get("enhanced-code")) or ""
    if name == "delivered":
        return [News(DELIVERED, recipient, name, _smtp(status.get("code"), text, enhanced or "2.0.0", False),
                     **ids)]
    permanent = data.get("severity") != "temporary"
    return [News(BOUNCED if permanent else DEFERRED, recipient, f"{name}/{data.get('severity')}",
                 _smtp(status.get("code"), text, enhanced, permanent), **ids)]


# -- Amazon SES: https://docs.aws.amazon.com/ses/latest/dg/notification-contents.html --------------------

# When a bounce carries no diagnostic, its type stands for the receiver's reply.
_SES_SUBTYPES = {
    "NoEmail": Reply(550, "5.1.1", "mailbox does not exist (SES bounce subtype NoEmail)"),
    "MailboxFull": Reply(452, "4.2.2", "mailbox full (SES bounce subtype MailboxFull)"),
    "MessageTooLarge": Reply(552, "5.3.4", "message too large (SES bounce subtype MessageTooLarge)"),
    "ContentRejected": Reply(550, "5.7.1", "content rejected (SES bounce subtype ContentRejected)"),
    "AttachmentRejected": Reply(550, "5.7.1", "content rejected: attachment (SES bounce subtype "
                                "AttachmentRejected)"),
    "Suppressed": Reply(550, "5.0.0", "on the SES suppression list"),
    "OnAccountSuppressionList": Reply(550, "5.0.0", "on the account's SES suppression list"),
}


def ses(document: Any) -> list[News]:
    data = _object(document, "Message")
    kind = _text(data.get("notificationType")) or _text(data.get("eventType")) or ""
    mail = data.get("mail") if isinstance(data.get("mail"), dict) else {}
    common = mail.get("commonHeaders") if isinstance(mail.get("commonHeaders"), dict) else {}
    froms = common.get("from") if isinstance(common.get("from"), list) else []
    ids = {"message_id": _text(common.get("messageId")), "provider_id": _text(mail.get("messageId")),
           "sending_domain": _domain(froms[0] if froms else mail.get("source"))}
    if kind == "Delivery":
        delivery = _object(data.get("delivery"), "Message.delivery")
        response = _text(delivery.get("smtpResponse")) or "250 delivered"
        return [News(DELIVERED, _recipient(r, "Message.delivery.recipients"), kind,
                     diagnostic_reply("2.0.0", response, False), **ids) for r in _list(delivery, "recipients")]
    if kind == "Bounce":
        bounce = _object(data.get("bounce"), "Message.bounce")
        permanent = bounce.get("bounceType") != "Transient"
        subtype = _text(bounce.get("bounceSubType")) or "General"
        news = []
        for n, item in enumerate(_list(bounce, "bouncedRecipients")):
            item = _object(item, f"Message.bounce.bouncedRecipients[{n}]")
            diagnostic = _text(item.get("diagnosticCode"))
            reply = diagnostic_reply(_text(item.get("status")) or "", diagnostic, permanent) if diagnostic else \
                _SES_SUBTYPES.get(subtype) or Reply(550 if permanent else 450, "5.0.0" if permanent else "4.0.0",
                                                    f"SES bounce {bounce.get('bounceType')}/{subtype}")
            news.append(News(BOUNCED, _recipient(item.get("emailAddress"), "emailAddress"), f"{kind}/{subtype}",
                             reply, **ids))
        return news
    if kind == "Complaint":
        complaint = _object(data.get("complaint"), "Message.complaint")
        feedback_type = _text(complaint.get("complaintFeedbackType")) or "abuse"
        return [News(COMPLAINED, _recipient(_object(item, "complainedRecipients").get("emailAddress"),
                                            "emailAddress"), kind, feedback_type=feedback_type, **ids)
                for item in _list(complaint, "complainedRecipients")]
    if kind == "DeliveryDelay":
        delay = _object(data.get("deliveryDelay"), "Message.deliveryDelay")
        return [News(DEFERRED, _recipient(_object(item, "delayedRecipients").get("emailAddress"), "emailAddress"),
                     kind, diagnostic_reply(_text(item.get("status")) or "", _text(item.get("diagnosticCode"))
                                            or _text(delay.get("delayType")) or "delayed", False), **ids)
                for item in _list(delay, "delayedRecipients")]
    return [News(IGNORED, None, kind or "unknown", **ids)]


def _list(data: dict[str, Any], key: str) -> list[Any]:
    value = data.get(key)
    if not isinstance(value, list) or not value:
        raise ValueError(f"{key}: a non-empty list is expected")
    return value


# -- Postmark: https://postmarkapp.com/developer/webhooks/webhooks-overview ---------------------------------

# Bounce types (https://postmarkapp.com/developer/api/bounce-api#bounce-types) that say something;
# the rest (AutoResponder, Unsubscribe, Subscribe, ...) are ignored.
_POSTMARK_BOUNCES = {
    "HardBounce": Reply(550, "5.1.1", "hard bounce: unknown user or mailbox not found"),
    "BadEmailAddress": Reply(550, "5.1.3", "invalid email address"),
    "DnsError": Reply(550, "5.1.2", "DNS error: the recipient's domain has no mail server"),
    "SoftBounce": Reply(450, "4.0.0", "soft bounce: temporarily undeliverable"),
    "Transient": Reply(450, "4.0.0", "transient delivery failure"),
    "SpamNotification": Reply(550, "5.7.1", "message rejected as spam"),
    "VirusNotification": Reply(550, "5.7.1", "message rejected: virus"),
    "Blocked": Reply(554, "5.7.1", "blocked by the receiver (ISP block)"),
    "DMARCPolicy": Reply(550, "5.7.1", "rejected by the sender domain's DMARC policy"),
    "ManuallyDeactivated": Reply(550, "5.0.0", "deactivated at Postmark"),
    "Unknown": Reply(550, "5.0.0", "unknown bounce"),
}


def postmark(document: Any) -> list[News]:
    data = _object(document, "the body")
    record = _text(data.get("RecordType")) or ""
    ids = {"provider_id": _text(data.get("MessageID")), "sending_domain": _domain(data.get("From"))}
    if record == "Delivery":
        return [News(DELIVERED, _recipient(data.get("Recipient"), "Recipient"), record,
                     diagnostic_reply("2.0.0", _text(data.get("Details")) or "250 delivered", False), **ids)]
    if record == "SpamComplaint":
        return [News(COMPLAINED, _recipient(data.get("Email"), "Email"), record, feedback_type="abuse", **ids)]
    bounce_type = _text(data.get("Type")) or ""
    if record != "Bounce" or bounce_type not in _POSTMARK_BOUNCES:
        return [News(IGNORED, _text(data.get("Email")), f"{record}/{bounce_type}".strip("/"), **ids)]
    fallback = _POSTMARK_BOUNCES[bounce_type]
    details = _text(data.get("Details")) or ""
    reply = diagnostic_reply(fallback.enhanced, details, fallback.code >= 500)
    if reply.text == details or not details:  # no SMTP reply in the details: the bounce type speaks
        reply = Reply(fallback.code, fallback.enhanced, f"{fallback.text}: {details}" if details else fallback.text)
    # Postmark does not try again after any bounce, a soft one included: each is final.
    return [News(BOUNCED, _recipient(data.get("Email"), "Email"), f"Bounce/{bounce_type}", reply, **ids)]


READERS: dict[str, Callable[[Any], list[News]]] = {
    "sendgrid": sendgrid, "mailgun": mailgun, "ses": ses, "postmark": postmark}
