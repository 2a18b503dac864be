"""The reply vocabulary: typed SMTP replies and the catalogue of our own.

A leaf: it imports nothing of the project, so every stage may use it.  A
``Reply`` is a basic code, an RFC 3463 enhanced status code (empty when a
remote server gave none) and text.  Policy and receive code raise
``Rejected`` with a catalogue reply; ``for_exception`` is the one place an
exception becomes the reply a client sees — anything but ``Rejected`` is a
generic temporary failure, so a client never sees internals (the detail
goes to the log with the queue id).  ``parse`` and ``from_server`` read a
reply that crossed the wire or was kept as text in the spool.

Failure: ``parse`` of text that is no reply gives ``None``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})$")
_DEFAULT_BY_CLASS = {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}


@dataclass(frozen=True)
class Reply:
    code: int
    enhanced: str  # "5.1.1"; "" when the server sent none
    text: str

    def __str__(self) -> str:
        if self.enhanced:
            return f"{self.code} {self.enhanced} {self.text}".rstrip()
        return f"{self.code} {self.text}".rstrip()

    @property
    def status(self) -> str:
        """The enhanced code, or the class default (``4.0.0``) when the server gave none."""
        return self.enhanced or _DEFAULT_BY_CLASS.get(self.code // 100, "4.0.0")

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600


def from_server(code: int, message: str) -> Reply:
    """A server's reply as aiosmtplib gives it: the code and the (multi-line) message."""
    text = " ".join(message.split())
    first, _, rest = text.partition(" ")
    if _ENHANCED.match(first) and first[0] == str(code)[0]:
        return Reply(code, first, rest)
    return Reply(code, "", text)


def parse(text: str) -> Reply | None:
    """``"550 5.1.1 user unknown"`` -> a Reply; None for text that is not one."""
    head, _, rest = text.strip().partition(" ")
    if len(head) != 3 or not head.isdigit() or head[0] not in "245":
        return None
    return from_server(int(head), rest)


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
AUTH_TEMPORARY = Reply(454, "4.7.0", "Temporary authentication failure: cannot check the token now, try later")
POD_UNKNOWN_YET = Reply(451, "4.7.0", "Cannot tell which pod this connection comes from yet, try again later")
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
TOO_MANY_JUNK = Reply(421, "4.7.0", "Too many commands without mail, closing connection")
PROXY_NOT_ALLOWED = Reply(421, "4.7.1", "Connections from your address are not accepted here")
TLS_HANDSHAKES_BUSY = Reply(421, "4.7.0", "Too many TLS handshakes in progress, try again later")
TLS_HANDSHAKE_TIMEOUT = Reply(421, "4.4.2", "TLS handshake not finished in time")
IDLE_TIMEOUT = Reply(421, "4.4.2", "Idle for too long, closing connection")
SESSION_TOO_LONG = Reply(421, "4.4.2", "Session open for too long, closing connection")
BARE_LINE_ENDING = Reply(550, "5.6.0", "Bare CR or LF in the message is not allowed; use CRLF line endings")
HEADER_UNREPRESENTABLE = Reply(550, "5.6.0", "A header line is longer than 998 octets and cannot be folded")
CONTENT_UNREPRESENTABLE = Reply(550, "5.6.0", "A line over 998 octets is in a part that cannot be re-encoded")
TOO_MANY_HOPS = Reply(554, "5.4.6", "Too many hops (Received: header fields): is there a mail loop?")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message too big")
DATA_BUSY = Reply(452, "4.3.1", "Too much mail in transfer at once, try again later")
LOCAL_ERROR = Reply(451, "4.3.0", "Requested action aborted: local error in processing")
INSUFFICIENT_STORAGE = Reply(452, "4.3.1", "Insufficient system storage, try again later")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")


def dsn_parameter_invalid(text: str) -> Reply:
    """A DSN parameter (RFC 3461) that breaks its grammar: the text names it and the rule."""
    return Reply(501, "5.5.4", text)


def queued(queue_id: str) -> Reply:
    return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")


def suppressed(why: str) -> Reply:
    """A recipient on the suppression list: 5.1.1, so a client drops the address as it would a dead one."""
    return Reply(550, "5.1.1", why)


def workload_without_policy(identity: str) -> Reply:
    """A workload authenticated, but no ``accounts.workloads`` entry (nor a default) lets it send."""
    return Reply(550, "5.7.1", f"{identity} may not send mail: no accounts.workloads entry names it")


def for_exception(exc: BaseException) -> Reply:
    """The reply a client gets for an exception raised while serving it."""
    if isinstance(exc, Rejected):
        return exc.reply
    return LOCAL_ERROR
