"""The one place that turns outcomes and errors into SMTP replies.

Policy and receive code raise ``Rejected`` with a catalogue reply; anything
else that escapes a session becomes a generic temporary failure, so a client
never sees internals (the detail goes to the log with the queue id).  It also
completes the replies aiosmtpd writes itself with an RFC 3463 enhanced status
code, so that every 2xx/4xx/5xx reply carries one (RFC 2034).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from spool import SpoolError


@dataclass(frozen=True)
class Reply:
    code: int
    enhanced: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"

    def with_text(self, text: str) -> Reply:
        return Reply(self.code, self.enhanced, text)


class Rejected(Exception):
    """Refuse the current command with ``reply``; ``detail`` is for the log."""

    def __init__(self, reply: Reply, detail: str = "") -> None:
        super().__init__(detail or reply.text)
        self.reply = reply
        self.detail = detail


SENDER_OK = Reply(250, "2.1.0", "Sender OK")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
BAD_RECIPIENT_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax")
BAD_SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_ADDRESS_SYNTAX = Reply(501, "5.1.3", "Bad address syntax")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
SENDER_FORBIDDEN = Reply(553, "5.7.1", "Sender address not allowed for this account")
FROM_FORBIDDEN = Reply(553, "5.7.1", "From: header address not allowed for this account")
FROM_MISSING = Reply(553, "5.7.1", "Message has no usable From: header")
RATE_MESSAGES = Reply(451, "4.7.1", "Message rate limit exceeded, try again later")
RATE_RECIPIENTS = Reply(451, "4.7.1", "Daily recipient limit exceeded, try again later")
ACCOUNT_TOO_BIG = Reply(552, "5.3.4", "Message too big for this account")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_USER_LOCKED = Reply(454, "4.7.0", "Too many failed authentications for this user, try again later")
AUTH_CLIENT_LOCKED = Reply(421, "4.7.0", "Too many failed authentications, closing connection")
AUTH_UNAVAILABLE = Reply(502, "5.5.1", "AUTH not available on this listener")
AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "AUTH not allowed during a mail transaction")
AUTH_BAD_RESPONSE = Reply(501, "5.5.2", "Cannot decode the authentication response")
AUTH_ABORTED = Reply(501, "5.7.0", "Authentication aborted")
TLS_ACTIVE = Reply(503, "5.5.1", "TLS is already active")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_FROM_YOU = Reply(421, "4.7.0", "Too many connections from your address, try again later")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
BARE_LINE_ENDING = Reply(550, "5.6.0", "Bare CR or LF in the message is not allowed; use CRLF line endings")
LOCAL_ERROR = Reply(451, "4.3.0", "Requested action aborted: local error in processing")
INSUFFICIENT_STORAGE = Reply(452, "4.3.1", "Insufficient system storage, try again later")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")


def queued(queue_id: str) -> Reply:
    return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")


def for_exception(exc: BaseException) -> Reply:
    """The reply a client gets for an exception raised while serving it."""
    if isinstance(exc, Rejected):
        return exc.reply
    if isinstance(exc, SpoolError):
        return LOCAL_ERROR
    return LOCAL_ERROR


# Enhanced codes for aiosmtpd's own replies, by basic code.
_DEFAULT_ENHANCED = {
    211: "2.0.0", 214: "2.0.0", 221: "2.0.0", 235: "2.7.0", 250: "2.0.0", 252: "2.0.0",
    421: "4.3.2", 450: "4.2.0", 451: "4.3.0", 452: "4.3.1", 454: "4.7.0",
    500: "5.5.2", 501: "5.5.4", 502: "5.5.1", 503: "5.5.1", 504: "5.5.4",
    530: "5.7.0", 534: "5.7.9", 535: "5.7.8", 538: "5.7.11",
    550: "5.0.0", 551: "5.1.6", 552: "5.3.4", 553: "5.1.3", 554: "5.0.0", 555: "5.5.4",
}
_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(?: |$)")
_CODE = re.compile(r"^([245]\d\d)([ -])(.*)$", re.DOTALL)


def add_enhanced_code(line: str) -> str:
    """``'503 Error: need MAIL command'`` -> ``'503 5.5.1 Error: need MAIL command'``."""
    if _HAS_ENHANCED.match(line):
        return line
    match = _CODE.match(line)
    if not match:
        return line  # 3xx intermediate replies carry no enhanced code
    code = int(match.group(1))
    enhanced = _DEFAULT_ENHANCED.get(code, f"{code // 100}.0.0")
    return f"{code}{match.group(2)}{enhanced} {match.group(3)}"
