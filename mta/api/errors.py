"""The API's error answers: an HTTP status, a stable code and the SMTP-equivalent status.

Owns the one mapping from the project's SMTP replies (``mta.replies``, what
the shared policy raises) to HTTP: a client of the API sees the same
enhanced status code an SMTP client would, with an HTTP status and a code
that stay the same across releases.  Anything that is not a ``Rejected``
is a local error (503, ``4.3.0``) and its detail goes to the log only.

Failure: none; every exception maps to an answer.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from mta import replies
from mta.replies import Reply


class ApiError(Exception):
    """Answer the request with ``status`` and a JSON error body."""

    def __init__(self, status: int, code: str, smtp_status: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.smtp_status, self.message = status, code, smtp_status, message

    def response(self) -> web.Response:
        body: dict[str, Any] = {"error": {"code": self.code, "status": self.smtp_status, "message": self.message}}
        return web.json_response(body, status=self.status)


def bad_request(code: str, message: str) -> ApiError:
    return ApiError(400, code, "5.5.2", message)


def suppressed(recipient: str, reply: Reply) -> ApiError:
    """A recipient on the suppression list: the whole request is refused, naming it (SMTP refuses that RCPT)."""
    return ApiError(422, "recipient_suppressed", reply.status, f"{recipient}: {reply.text}")


UNAUTHENTICATED = ApiError(401, "unauthenticated", "5.7.8",
                           "missing or invalid API key or ServiceAccount token (Authorization: Bearer)")
IDENTITY_UNAVAILABLE = ApiError(503, "identity_unavailable", "4.7.0",
                                "the token cannot be checked now, try again later")


def workload_not_allowed(identity: str) -> ApiError:
    return ApiError(403, "workload_not_allowed", "5.7.1",
                    f"{identity} may not send mail: no accounts.workloads entry names it")


NOT_FOUND = ApiError(404, "not_found", "5.1.0", "no such message queued by this account")
SHUTTING_DOWN = ApiError(503, "shutting_down", "4.3.2", "service shutting down, try again later")

# The catalogue replies the shared policy raises, by HTTP status and code.
_BY_REPLY: dict[Reply, tuple[int, str]] = {
    replies.SENDER_FORBIDDEN: (403, "sender_not_allowed"),
    replies.FROM_FORBIDDEN: (403, "from_not_allowed"),
    replies.FROM_MISSING: (400, "from_missing"),
    replies.RATE_MESSAGES: (429, "rate_limited"),
    replies.RATE_RECIPIENTS: (429, "rate_limited"),
    replies.ACCOUNT_TOO_BIG: (413, "message_too_large"),
    replies.TOO_MANY_RECIPIENTS: (400, "too_many_recipients"),
    replies.BAD_SENDER_SYNTAX: (400, "invalid_address"),
    replies.BAD_RECIPIENT_SYNTAX: (400, "invalid_address"),
    replies.BAD_ADDRESS_SYNTAX: (400, "invalid_address"),
    replies.BARE_LINE_ENDING: (400, "bare_line_ending"),
    replies.CONTENT_UNREPRESENTABLE: (400, "content_unrepresentable"),
    replies.TOO_MANY_HOPS: (400, "too_many_hops"),
    replies.INSUFFICIENT_STORAGE: (503, "insufficient_storage"),
    replies.LOCAL_ERROR: (503, "local_error"),
}


def for_exception(exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    reply = replies.for_exception(exc)
    status, code = _BY_REPLY.get(reply, (400, "rejected") if reply.permanent else (503, "temporary_failure"))
    return ApiError(status, code, reply.status, reply.text)
