"""Why a delivery failed: the bounce category of a reply, from data-driven rules.

Owns the vocabulary of categories and the rule table.  A ``Rule`` matches
a typed ``Reply`` on any of the enhanced status code, the basic code (both
regular expressions matched against the whole code) and the reply text (a
regular expression searched for, case-insensitive); every part a rule
gives must match.  ``Classifier`` tries the operator's rules from the
configuration first, then the built-in rules for the large mailbox
providers (their documented reply texts), then generic text rules, then
the RFC 3463 enhanced codes, then the basic code's class: the first match
wins.  The category goes on every ``bounced``, ``deferred`` and
``expired`` event, into ``kubemta_bounces_total`` and into the DSN; only
``invalid_recipient`` and ``invalid_domain`` say something about the
address itself (``ADDRESS_CATEGORIES``), which is what the suppression
list acts on.

Failure: none at run time — a reply no rule matches is ``other`` (a 5xx)
or ``transient`` (a 4xx).  A bad regular expression is a configuration
error, raised by ``mta.config`` when it validates ``bounces.rules``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from mta.replies import Reply


class Category(StrEnum):
    INVALID_RECIPIENT = "invalid_recipient"
    INVALID_DOMAIN = "invalid_domain"
    MAILBOX_FULL = "mailbox_full"
    MESSAGE_TOO_LARGE = "message_too_large"
    CONTENT_REJECTED = "content_rejected"
    REPUTATION = "reputation"  # blocklisted, low reputation, rate limited: says nothing of the address
    POLICY = "policy"  # SPF, DKIM, DMARC, reverse DNS, relay refused: says nothing of the address
    TLS = "tls"
    ROUTING = "routing"
    TRANSIENT = "transient"
    OTHER = "other"


CATEGORIES = tuple(item.value for item in Category)
# The categories that mean the address (or its domain) is dead: a hard bounce
# of one of these may suppress the address.  Never reputation or policy,
# which are about the sender, so suppressing would punish good recipients
# during an IP warm-up.
ADDRESS_CATEGORIES = frozenset({Category.INVALID_RECIPIENT, Category.INVALID_DOMAIN})


@dataclass(frozen=True)
class Rule:
    category: Category
    enhanced: re.Pattern[str] | None = None
    code: re.Pattern[str] | None = None
    text: re.Pattern[str] | None = None
    provider: str = ""  # whose documented reply this is, for people reading the table

    def matches(self, reply: Reply) -> bool:
        if self.enhanced is not None and not self.enhanced.fullmatch(reply.status):
            return False
        if self.code is not None and not self.code.fullmatch(str(reply.code)):
            return False
        return self.text is None or self.text.search(reply.text) is not None


def rule(category: Category | str, *, enhanced: str | None = None, code: str | None = None,
         text: str | None = None, provider: str = "") -> Rule:
    """A rule from the strings a table or a config file holds; ``re.error`` for a bad expression."""
    if enhanced is None and code is None and text is None:
        raise ValueError("a rule needs at least one of enhanced, code, text")
    return Rule(Category(category),
                re.compile(enhanced) if enhanced is not None else None,
                re.compile(code) if code is not None else None,
                re.compile(text, re.IGNORECASE) if text is not None else None,
                provider)


R = Category
# The large mailbox providers, from their published reply references.  Only
# the wording that the generic rules below would get wrong (or get only by
# the enhanced code) is listed: a text that names a reputation problem must
# win over the enhanced code it comes with.
PROVIDER_RULES: tuple[Rule, ...] = (
    # Gmail: "SMTP error reference", https://support.google.com/a/answer/3726730
    rule(R.REPUTATION, text=r"very low reputation of the sending (IP address|domain)", provider="gmail"),
    rule(R.REPUTATION, text=r"unusual rate of unsolicited mail", provider="gmail"),
    rule(R.REPUTATION, text=r"IP you're using to send mail is not authorized to send email directly",
         provider="gmail"),
    rule(R.REPUTATION, text=r"receiving mail (too quickly|at a rate that prevents)", provider="gmail"),
    rule(R.POLICY, text=r"sender is unauthenticated|does not have a PTR record|due to domain's DMARC policy|"
         r"does not pass (SPF|DKIM|DMARC)|fails? to pass authentication checks", provider="gmail"),
    rule(R.CONTENT_REJECTED, text=r"likely unsolicited mail|potential (security issue|to be spam)",
         provider="gmail"),
    rule(R.TLS, text=r"TLS required for RCPT domain", provider="gmail"),
    rule(R.INVALID_RECIPIENT, text=r"email account that you tried to reach (does not exist|is disabled|"
         r"is inactive)", provider="gmail"),
    rule(R.MAILBOX_FULL, text=r"email account that you tried to reach is over quota", provider="gmail"),
    rule(R.MESSAGE_TOO_LARGE, text=r"exceeded Google's message size limits", provider="gmail"),
    # Microsoft (Outlook.com, Exchange Online): "Email non-delivery reports and
    # SMTP errors in Exchange Online", https://learn.microsoft.com/en-us/exchange/mail-flow-best-practices/non-delivery-reports-in-exchange-online/non-delivery-reports-in-exchange-online
    # and the Outlook.com postmaster pages, https://sendersupport.olc.protection.outlook.com/pm/
    rule(R.REPUTATION, text=r"part of their network is on our block list|\((S3150|S3140|S844)\)",
         provider="microsoft"),
    rule(R.REPUTATION, text=r"temporarily rate limited due to IP reputation|banned sending IP|"
         r"traffic not accepted from this IP|Access denied, .*IP .*(block|reputation)", provider="microsoft"),
    rule(R.REPUTATION, enhanced=r"[45]\.7\.(650|606|708|750|705)", provider="microsoft"),
    rule(R.POLICY, enhanced=r"5\.7\.509", provider="microsoft"),  # sending domain fails DMARC
    rule(R.INVALID_RECIPIENT, text=r"RESOLVER\.ADR\.(Recip|ExRecip|Recipient)NotFound|"
         r"Recipient address rejected: Access denied", provider="microsoft"),
    rule(R.INVALID_RECIPIENT, enhanced=r"5\.5\.0", text=r"mailbox unavailable", provider="microsoft"),
    # Yahoo: "SMTP error codes", https://senders.yahooinc.com/smtp-error-codes/
    rule(R.REPUTATION, text=r"\[TS[S0-9]*\d\]|temporarily deferred due to unexpected volume or user complaints|"
         r"permanently deferred", provider="yahoo"),
    rule(R.REPUTATION, text=r"\[BL\d+\]", provider="yahoo"),
    rule(R.INVALID_RECIPIENT, text=r"This user doesn't have a \S+ account|mailbox not found", provider="yahoo"),
    rule(R.CONTENT_REJECTED, text=r"not accepted for policy reasons|\[PH\d+\]", provider="yahoo"),
    # Apple iCloud: postmaster information, https://support.apple.com/en-us/102322
    rule(R.REPUTATION, text=r"deferred due to excessive volume", provider="apple"),
    rule(R.POLICY, text=r"rejected due to \S+ DMARC policy", provider="apple"),
    rule(R.CONTENT_REJECTED, text=r"\[CS\d+\] Message rejected due to local policy", provider="apple"),
    rule(R.INVALID_RECIPIENT, text=r"user does not exist|Relay not permitted for user", provider="apple"),
)

# Wording many servers use (Postfix, Exim, Sendmail, appliances).  Reputation
# comes first so that "blocked ... no such user"-style mixtures never suppress.
GENERIC_TEXT_RULES: tuple[Rule, ...] = (
    rule(R.REPUTATION, text=r"spamhaus|spamcop|barracuda|block ?list|black ?list|blocked using|"
         r"listed (at|in|on|by)|\bRBL\b|DNSBL|reputation|rate limit|too many (connections|messages)|"
         r"excessive volume|sending limit|throttl"),
    rule(R.POLICY, text=r"\b(SPF|DKIM|DMARC)\b|unauthenticated|authentication (failed|required)|"
         r"reverse DNS|PTR record"),
    rule(R.TLS, text=r"STARTTLS|\bTLS\b|encryption (required|needed)"),
    rule(R.MAILBOX_FULL, text=r"over ?quota|quota exceeded|mailbox (is )?full|exceeded storage|"
         r"insufficient (system )?storage for user"),
    rule(R.MESSAGE_TOO_LARGE, text=r"message (size )?exceeds|too (large|big)|size limit"),
    rule(R.CONTENT_REJECTED, text=r"\bspam\b|unsolicited|virus|malware|phish|content (rejected|refused)"),
    rule(R.INVALID_DOMAIN, code=r"5\d\d", text=r"domain (\S+ )?(does not exist|not found)|no such domain|"
         r"host (or domain name )?not found|unrouteable (address|domain)"),
    rule(R.INVALID_RECIPIENT, code=r"5\d\d", text=r"user unknown|unknown user|no such (user|mailbox|recipient)|"
         r"mailbox (does not exist|unavailable|not found)|recipient (address )?(rejected|unknown|not found)|"
         r"address (does not exist|rejected)|invalid (recipient|mailbox|address)|does not exist|"
         r"account (is )?(disabled|inactive)"),
)

# RFC 3463 (and RFC 7372 for authentication, RFC 7504 for null MX).
ENHANCED_RULES: tuple[Rule, ...] = (
    rule(R.INVALID_RECIPIENT, enhanced=r"5\.1\.(0|1|3|6)|5\.2\.1"),
    rule(R.INVALID_DOMAIN, enhanced=r"5\.1\.2|5\.1\.10|5\.7\.27"),  # 5.7.27: the domain has a null MX
    rule(R.MAILBOX_FULL, enhanced=r"[45]\.2\.2"),
    rule(R.MESSAGE_TOO_LARGE, enhanced=r"[45]\.(2\.3|3\.4)"),
    rule(R.POLICY, enhanced=r"[45]\.7\.(2[0-6])"),  # DKIM, SPF, DMARC, reverse DNS (RFC 7372)
    rule(R.TLS, enhanced=r"[45]\.7\.(10|11|5)"),
    rule(R.ROUTING, enhanced=r"[45]\.4\.\d+"),
    rule(R.CONTENT_REJECTED, enhanced=r"[45]\.6\.\d+"),
    rule(R.POLICY, enhanced=r"5\.7\.\d+"),
)

DEFAULT_RULES: tuple[Rule, ...] = PROVIDER_RULES + GENERIC_TEXT_RULES + ENHANCED_RULES


class Classifier:
    """The category of a reply: operator rules first, then the built-in table."""

    def __init__(self, extra: Iterable[Rule] = ()) -> None:
        self.rules: Sequence[Rule] = (*extra, *DEFAULT_RULES)

    def classify(self, reply: Reply | None) -> Category:
        if reply is None:
            return Category.OTHER
        for item in self.rules:
            if item.matches(reply):
                return item.category
        return Category.OTHER if reply.permanent else Category.TRANSIENT
