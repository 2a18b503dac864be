"""Email service provider presets: what ``routes[].provider`` fills in.

Each preset holds what the provider documents for its SMTP relay: the host
(per region where the provider has regions), port 587 with STARTTLS
required and the certificate verified, the user-name convention for the
login, the largest message it takes, and reply texts that mean "slow
down".  Where a provider's documentation gave no value (a size limit, a
throttling text), the preset leaves it unset rather than guess; an
operator sets it on the route.  Anything set on the route wins over the
preset (``mta.config.RouteConfig`` applies them).

This module imports nothing of the MTA: the config reads it.
Failure: ``resolve`` raises ``ValueError`` naming the route key at fault
(``provider`` or ``region``); ``mta.config`` reports it with the route's path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

MB = 1024 * 1024
PORT = 587  # every provider here documents STARTTLS on 587
# AWS region names: us-east-1, eu-west-2, ap-southeast-3, us-gov-west-1, ...
_AWS_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d{1,2}$")


@dataclass(frozen=True)
class Provider:
    name: str
    docs: str  # the page the values come from
    host: str = ""  # one host for every account
    regions: dict[str, str] = field(default_factory=dict)  # region -> host, for providers with fixed regions
    region_host: str = ""  # a host pattern with {region}, for providers with many regions (SES)
    # The login user when the Secret holds only the key (None: the key is the user name too).
    auth_user: str | None = None
    max_message_size: int | None = None
    throttle_texts: tuple[str, ...] = ()

    def host_for(self, region: str | None) -> str:
        if self.region_host:
            if region is None:
                raise ValueError(f"region: provider {self.name!r} needs a region (such as us-east-1)")
            if not _AWS_REGION.match(region):
                raise ValueError(f"region: {region!r} is not an AWS region name such as us-east-1")
            return self.region_host.format(region=region)
        if self.regions:
            if region is None:
                raise ValueError(f"region: provider {self.name!r} needs a region: {' or '.join(self.regions)}")
            if region not in self.regions:
                raise ValueError(f"region: provider {self.name!r} has no region {region!r} "
                                 f"(known: {', '.join(self.regions)})")
            return self.regions[region]
        if region is not None:
            raise ValueError(f"region: provider {self.name!r} has one host for every account; remove region")
        return self.host


PROVIDERS: dict[str, Provider] = {
    # https://www.twilio.com/docs/sendgrid/for-developers/sending-email/integrating-with-the-smtp-api
    # host smtp.sendgrid.net, port 587, user name the exact string "apikey", password the API key.
    # No SMTP message-size limit or throttling reply text is given on that page.
    "sendgrid": Provider("sendgrid", host="smtp.sendgrid.net", auth_user="apikey",
                         docs="https://www.twilio.com/docs/sendgrid/for-developers/sending-email/"
                              "integrating-with-the-smtp-api"),
    # https://documentation.mailgun.com/docs/mailgun/user-manual/smtp-protocol/smtp-relay
    # smtp.mailgun.org, [smtp.mailgun.org]:587, per-domain SMTP credentials (postmaster@domain:password);
    # EU domains use smtp.eu.mailgun.org (https://cloud.google.com/compute/docs/tutorials/sending-mail/
    # using-mailgun).  "The maximum message size Mailgun supports is 25MB":
    # https://documentation.mailgun.com/docs/mailgun/user-manual/sending-messages/send-http
    "mailgun": Provider("mailgun", regions={"us": "smtp.mailgun.org", "eu": "smtp.eu.mailgun.org"},
                        max_message_size=25 * MB,
                        docs="https://documentation.mailgun.com/docs/mailgun/user-manual/smtp-protocol/smtp-relay"),
    # https://docs.aws.amazon.com/ses/latest/dg/smtp-connect.html: every connection TLS, STARTTLS on
    # 25, 587 or 2587; SMTP credentials are per region (user:password from the SES console).
    # https://docs.aws.amazon.com/ses/latest/dg/manage-sending-quotas-errors.html: over the sending
    # rate or the daily quota, SMTP answers "454 Throttling failure: Maximum sending rate exceeded"
    # or "454 Throttling failure: Daily message quota exceeded".
    # No message-size limit was found for the SMTP interface: set max_message_size on the route.
    "ses": Provider("ses", region_host="email-smtp.{region}.amazonaws.com",
                    throttle_texts=("Throttling failure", "Maximum sending rate exceeded",
                                    "Daily message quota exceeded"),
                    docs="https://docs.aws.amazon.com/ses/latest/dg/smtp-connect.html"),
    # http://developer.postmarkapp.com/developer-send-smtp.html: smtp.postmarkapp.com, ports 25, 2525
    # or 587, STARTTLS, the server API token as both user name and password (a Secret holding only
    # the token is read that way: ``mta.delivery.client.route_credentials``).
    # https://postmarkapp.com/support/article/1056-what-are-the-attachment-and-email-size-limits:
    # total message size, attachments included, 10 MB.  No throttling reply text is documented.
    "postmark": Provider("postmark", host="smtp.postmarkapp.com", max_message_size=10 * MB,
                         docs="http://developer.postmarkapp.com/developer-send-smtp.html"),
    # https://mailchimp.com/developer/transactional/docs/smtp-integration/: smtp.mandrillapp.com,
    # ports 25, 587 or 2525 with STARTTLS; the password is any active API key and the user name is
    # not used to authenticate (the primary contact email is recommended): the Secret holds
    # user:key.  No size limit or throttling reply text is given on that page.
    "mandrill": Provider("mandrill", host="smtp.mandrillapp.com",
                         docs="https://mailchimp.com/developer/transactional/docs/smtp-integration/"),
}


def resolve(route: dict[str, Any]) -> dict[str, Any]:
    """The route's keys with the preset's filled in where the route left them out."""
    name = route.get("provider")
    if name is None:
        return route
    provider = PROVIDERS.get(str(name))
    if provider is None:
        raise ValueError(f"provider: {name!r} is not a known provider (known: {', '.join(PROVIDERS)})")
    region = route.get("region")
    resolved = dict(route)
    if "relay" not in route or route["relay"] is None:
        resolved["relay"] = f"{provider.host_for(None if region is None else str(region))}:{PORT}"
    elif region is not None:
        provider.host_for(str(region))  # a bad region is an error even where relay overrides it
    resolved.setdefault("tls", "starttls")
    resolved.setdefault("tls_verify", True)
    if provider.auth_user is not None:
        resolved.setdefault("auth_user", provider.auth_user)
    if provider.max_message_size is not None:
        resolved.setdefault("max_message_size", provider.max_message_size)
    resolved.setdefault("throttle_texts", list(provider.throttle_texts))
    return resolved
