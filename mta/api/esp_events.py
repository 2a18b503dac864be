"""``POST /v1/events/{provider}``: the event webhooks of email service providers.

For mail relayed through a provider (a smart-host route), the provider is
the one that hears back; it posts what it heard here.  Each request is
proven first (``mta.feedback.esp_auth``: SendGrid's ECDSA signature,
Mailgun's HMAC, the SNS signature of an SES notification, Postmark's basic
auth), then read (``mta.feedback.esp``), then acted on exactly as a report
to the feedback listener would be (``mta.feedback.actions``): the same
``delivered``/``bounced``/``deferred``/``complained`` events, with
``source: esp:<provider>``, and the same suppression list.  A signed SNS
``SubscriptionConfirmation`` for a configured topic is confirmed by visiting
its ``SubscribeURL`` (on an AWS host only).

Answers: ``200 {"events": N}`` once acted on; 401 for a request that proves
nothing (logged as ``esp_request_refused``, never acted on); 400 for a body
that is not the provider's JSON; 404 for a provider not configured; 413 over
``MAX_BODY``; 503 when the SNS certificate cannot be fetched or acting
failed, so the provider retries (a retried Mailgun token or SNS message id
is taken again only if the first try was not acted on).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from mta.api.errors import ApiError
from mta.config import Config, EspEventsConfig
from mta.feedback import esp
from mta.feedback.actions import FeedbackActions
from mta.feedback.esp_auth import (
    BasicAuth,
    CertificateUnavailable,
    Forged,
    MailgunSignature,
    SendgridSignature,
    SnsSignature,
)
from mta.obs.log import event

log = logging.getLogger(__name__)

MAX_BODY = 8 * 1024 * 1024  # SendGrid batches events; its posts stay well below this
BODY_TIMEOUT = 60.0
FETCH_TIMEOUT = 10.0  # an SNS certificate or SubscribeURL
MAX_CERTIFICATE = 64 * 1024


class EspEvents:
    def __init__(self, settings: EspEventsConfig, actions: FeedbackActions,
                 fetch: Callable[[str], Any] | None = None) -> None:
        """Reads the configured key files; ``ValueError`` names the key at fault.

        ``fetch(url) -> bytes``: an HTTPS GET (SNS certificates, SubscribeURL); default, aiohttp."""
        self.actions = actions
        self.fetch = fetch or self._get
        self.session: aiohttp.ClientSession | None = None
        self.ssl: ssl.SSLContext | None = None
        self.sendgrid: SendgridSignature | None = None
        self.mailgun: MailgunSignature | None = None
        self.sns: SnsSignature | None = None
        self.postmark: BasicAuth | None = None
        self.confirm = False
        if settings.sendgrid is not None:
            try:
                self.sendgrid = SendgridSignature(settings.sendgrid.public_key_file.read_bytes(),
                                                  settings.sendgrid.max_age)
            except ValueError as exc:
                raise ValueError(f"feedback.esp.sendgrid.public_key_file: {exc}") from None
        if settings.mailgun is not None:
            key = settings.mailgun.signing_key_file.read_bytes().strip()
            if not key:
                raise ValueError("feedback.esp.mailgun.signing_key_file: the file is empty")
            self.mailgun = MailgunSignature(key, settings.mailgun.max_age)
        if settings.ses is not None:
            self.sns = SnsSignature(settings.ses.topic_arns, settings.ses.cert_hosts, self.fetch)
            self.confirm = settings.ses.confirm_subscriptions
            try:
                self.ssl = ssl.create_default_context(cafile=str(settings.ses.ca_file) if settings.ses.ca_file
                                                      else None)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise ValueError(f"feedback.esp.ses.ca_file: not a CA bundle: {exc}") from None
        if settings.postmark is not None:
            try:
                self.postmark = BasicAuth(settings.postmark.credentials_file.read_text().partition("\n")[0])
            except ValueError as exc:
                raise ValueError(f"feedback.esp.postmark.credentials_file: {exc}") from None
        self.providers = settings.providers

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def _get(self, url: str) -> bytes:
        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT))
        try:
            async with self.session.get(url, ssl=self.ssl, allow_redirects=False) as response:
                if response.status != 200:
                    raise CertificateUnavailable(f"{url}: HTTP {response.status}")
                body = await response.content.read(MAX_CERTIFICATE + 1)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise CertificateUnavailable(f"{url}: {exc or type(exc).__name__}") from None
        if len(body) > MAX_CERTIFICATE:
            raise CertificateUnavailable(f"{url}: more than {MAX_CERTIFICATE} bytes")
        return body

    # -- the route ---------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.Response:
        provider, client = request.match_info["provider"], request.remote or "?"
        if provider not in self.providers:
            return ApiError(404, "unknown_provider", "5.1.0", f"no events are taken from {provider!r} "
                            f"(feedback.esp configures: {', '.join(self.providers)})").response()
        if request.content_length is not None and request.content_length > MAX_BODY:
            response = ApiError(413, "request_too_large", "5.3.4", f"at most {MAX_BODY} bytes").response()
            response.force_close()
            return response
        try:
            if self.postmark is not None and provider == "postmark":
                self.postmark.check(request.headers)  # before reading a body nobody proved
            async with asyncio.timeout(BODY_TIMEOUT):
                body = await _body(request)
            news, acted = await self._proven(provider, request, body)
        except Forged as exc:
            event("esp_request_refused", level=logging.WARNING, provider=provider, client=client, reason=str(exc))
            return ApiError(401, "unauthenticated", "5.7.8", f"not proven to come from {provider}").response()
        except CertificateUnavailable as exc:
            log.warning("%s event from %s not checked: %s", provider, client, exc)
            return ApiError(503, "certificate_unavailable", "4.7.0", "the signing certificate could not be "
                            "fetched; try again later").response()
        except TimeoutError:
            return ApiError(408, "body_timeout", "4.4.2", "request body not received in time").response()
        except ApiError as exc:
            response = exc.response()
            if exc.status == 413:
                response.force_close()  # the rest of the body may still be on its way
            return response
        except (ValueError, UnicodeDecodeError) as exc:  # json.JSONDecodeError is a ValueError
            event("esp_request_refused", level=logging.WARNING, provider=provider, client=client,
                  reason=f"not {provider}'s JSON: {exc}")
            return ApiError(400, "invalid_event", "5.6.0", f"not {provider}'s event JSON: {exc}").response()
        try:
            for item in news:
                await self._act(provider, client, item)
        except Exception:  # answered 503: the provider posts it again
            log.exception("%s events from %s not acted on", provider, client)
            return ApiError(503, "local_error", "4.3.0", "events not taken; try again later").response()
        acted()
        return web.json_response({"events": len(news)})

    async def _proven(self, provider: str, request: web.Request,
                      body: bytes) -> tuple[list[esp.News], Callable[[], None]]:
        """The news a proven request brings, and what to remember once it is acted on."""
        if provider == "sendgrid":
            assert self.sendgrid is not None
            self.sendgrid.check(request.headers, body)
            return esp.sendgrid(json.loads(body)), lambda: None
        document = json.loads(body)
        if provider == "mailgun":
            mailgun = self.mailgun
            assert mailgun is not None
            token = mailgun.check(document)
            return esp.mailgun(document), lambda: mailgun.tokens.add(token)
        if provider == "ses":
            return await self._sns(document, request.remote or "?")
        return esp.postmark(document), lambda: None

    async def _sns(self, message: Any, client: str) -> tuple[list[esp.News], Callable[[], None]]:
        sns = self.sns
        assert sns is not None
        if not isinstance(message, dict):
            raise ValueError("an SNS message is a JSON object (is raw message delivery on? It must be off: "
                             "a raw message carries no signature)")
        await sns.check(message)
        message_id = str(message.get("MessageId") or "")
        if message_id in sns.messages:
            event("esp_event_duplicate", provider="ses", message_id=message_id, client=client)
            return [], lambda: None

        def remember() -> None:
            sns.messages.add(message_id)

        kind = message.get("Type")
        if kind == "SubscriptionConfirmation":
            url = str(message.get("SubscribeURL") or "")
            if not self.confirm:
                event("esp_subscription_pending", provider="ses", topic=message.get("TopicArn"), subscribe_url=url)
            elif not sns.trusted_url(url):
                raise Forged(f"SubscribeURL {url[:300]!r} is not HTTPS on a host matching cert_hosts")
            else:
                await self.fetch(url)
                event("esp_subscription_confirmed", provider="ses", topic=message.get("TopicArn"))
            return [], remember
        if kind == "UnsubscribeConfirmation":
            event("esp_subscription_ended", level=logging.WARNING, provider="ses", topic=message.get("TopicArn"))
            return [], remember
        return esp.ses(json.loads(str(message.get("Message") or ""))), remember

    async def _act(self, provider: str, client: str, item: esp.News) -> None:
        source = f"esp:{provider}"
        fields = {"provider": provider, "esp_event": item.event, "message_id": item.message_id,
                  "provider_message_id": item.provider_id, "client": client}
        if item.kind == esp.IGNORED or item.recipient is None:
            event("esp_event_ignored", level=logging.DEBUG, recipient=item.recipient, **fields)
        elif item.kind == esp.DELIVERED:
            assert item.reply is not None
            self.actions.delivered(item.recipient, str(item.reply), source=source,
                                   sending_domain=item.sending_domain, **fields)
        elif item.kind == esp.COMPLAINED:
            # A verified provider is trusted: it saw the complaint itself.
            await self.actions.complained(item.recipient, feedback_type=item.feedback_type or "abuse", trusted=True,
                                          source=source, queue_id=None, sending_domain=item.sending_domain,
                                          **fields)
        else:
            assert item.reply is not None
            await self.actions.bounced(item.recipient, item.reply, delayed=item.kind == esp.DEFERRED, trusted=True,
                                       source=source, queue_id=None, sending_domain=item.sending_domain, **fields)


async def _body(request: web.Request) -> bytes:
    """The whole body, chunked or not; ``ApiError`` 413 past ``MAX_BODY``."""
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > MAX_BODY:
            raise ApiError(413, "request_too_large", "5.3.4", f"at most {MAX_BODY} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def build(config: Config, actions: FeedbackActions) -> EspEvents | None:
    """The endpoint ``feedback.esp`` asks for, or None; ``ValueError`` (naming the key) for a bad key file."""
    if not config.feedback.esp.providers:
        return None
    return EspEvents(config.feedback.esp, actions)
