"""Turn the bytes a client sent into the message we queue.

Owns: line-ending normalisation (a bare CR or LF becomes CRLF, so nothing
smuggling-shaped is stored or later signed), the trace header (``Received``),
our ``Authentication-Results`` for authenticated clients — after removing
any that claim our authserv-id (RFC 8601 §5) — and the ``Message-ID``/
``Date`` a submission may lack (RFC 6409 §8).
It does not parse MIME and never changes the body beyond line endings.
Failure: none expected; it works on any bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime, make_msgid

import authres

from mta.message import header_fields, header_names, normalise, split_header

_AUTH_RESULTS = re.compile(rb"^authentication-results[ \t]*:", re.IGNORECASE)


@dataclass(frozen=True)
class Arrival:
    """Facts of the session a message came in through."""

    queue_id: str
    helo: str
    client_ip: str
    hostname: str  # ours
    protocol: str  # SMTP, ESMTP, ESMTPS, ...
    recipients: tuple[str, ...]
    when: datetime
    auth_user: str | None = None
    client_pod: str | None = None  # "namespace/pod": auth_user was known by the client's pod, not by AUTH
    authserv_id: str | None = None  # ours; defaults to hostname


def _clean(text: str) -> str:
    # Client-supplied text goes into a header: keep it on one line, printable.
    return re.sub(r"[^\x21-\x7e]", "?", text)[:255] or "unknown"


def received_header(arrival: Arrival) -> bytes:
    parts = [
        f"Received: from {_clean(arrival.helo)} ([{_clean(arrival.client_ip)}])",
        f"\tby {arrival.hostname} (kubemta) with {arrival.protocol} id {arrival.queue_id}",
    ]
    date = format_datetime(arrival.when)
    if len(arrival.recipients) == 1:
        parts.append(f"\tfor <{_clean(arrival.recipients[0])}>; {date}")
    else:
        parts[-1] += ";"
        parts.append(f"\t{date}")
    return ("\r\n".join(parts) + "\r\n").encode("ascii")


def _without_comments(text: str) -> str:
    """``text`` with its leading CFWS removed: whitespace and (nested, escaped) comments."""
    depth, i = 0, 0
    while i < len(text):
        char = text[i]
        if char == "\\" and depth:
            i += 2
            continue
        if char == "(":
            depth += 1
        elif char == ")" and depth:
            depth -= 1
        elif not depth and not char.isspace():
            break
        i += 1
    return text[i:]


def claimed_authserv_id(value: str) -> str | None:
    """The authserv-id an Authentication-Results value names; None when it names none.

    authres reads the usual form; it refuses a leading comment and a quoted
    id (both legal, RFC 8601 §2.2), which a forger uses for exactly that.
    """
    try:
        claimed = authres.AuthenticationResultsHeader.parse_value(value).authserv_id
    except Exception:  # noqa: BLE001 - authres raises many kinds; read the id ourselves
        claimed = None
    if claimed:
        return str(claimed)
    rest = _without_comments(value)
    if rest.startswith('"'):
        quoted = re.match(r'"((?:[^"\\]|\\.)*)"', rest)
        return re.sub(r"\\(.)", r"\1", quoted[1]) if quoted else None
    token = re.split(r"[;\s(]", rest, maxsplit=1)[0]
    return token or None


def _claims_us(field: bytes, authserv_id: str) -> bool:
    value = field.split(b":", 1)[1].decode("utf-8", errors="replace")
    claimed = claimed_authserv_id(value)
    # One that names no authserv-id at all is no one's result: it is dropped too.
    return claimed is None or claimed.lower().rstrip(".") == authserv_id.lower().rstrip(".")


def strip_forged_results(header: bytes, authserv_id: str) -> bytes:
    """Drop Authentication-Results fields that claim to be ours (RFC 8601 §5); names in any case."""
    if b"authentication-" not in header.lower():
        return header
    kept = [f for f in header_fields(header) if not (_AUTH_RESULTS.match(f) and _claims_us(f, authserv_id))]
    return b"".join(f + b"\r\n" for f in kept)


POD_METHOD = "x-kubernetes-pod"  # no registered method says "known by its source pod" (RFC 8601 §2.7)


def authentication_results(authserv_id: str, user: str, pod: str | None = None) -> bytes:
    result: authres.AuthenticationResult
    if pod is None:
        result = authres.SMTPAUTHAuthenticationResult(result="pass", smtp_auth=user)
    else:
        # No SMTP AUTH took place: smtp.auth would claim one.
        result = authres.AuthenticationResult(method=POD_METHOD, result="pass", properties=[
            authres.AuthenticationResultProperty("policy", "serviceaccount", user),
            authres.AuthenticationResultProperty("policy", "pod", pod)])
    text = str(authres.AuthenticationResultsHeader(authserv_id=authserv_id, results=[result]))
    return _clean_header(text).encode("utf-8") + b"\r\n"


def _clean_header(text: str) -> str:
    return re.sub(r"[\r\n\x00]", "", text)


def prepare(data: bytes, arrival: Arrival) -> bytes:
    """The message as queued: normalised, traced, with Message-ID and Date."""
    data = normalise(data)
    header, rest = split_header(data)
    names = header_names(header)
    if header and not names:
        # No header block at all: the whole text is body.
        header, rest = b"", b"\r\n" + data
    authserv_id = arrival.authserv_id or arrival.hostname
    header = strip_forged_results(header, authserv_id)
    added = [received_header(arrival)]
    if arrival.auth_user:
        added.insert(0, authentication_results(authserv_id, arrival.auth_user, arrival.client_pod))
    extra = b""
    if b"message-id" not in names:
        extra += f"Message-ID: {make_msgid(domain=arrival.hostname)}\r\n".encode("ascii")
    if b"date" not in names:
        extra += f"Date: {format_datetime(arrival.when)}\r\n".encode("ascii")
    return b"".join(added) + header + extra + rest


def now() -> datetime:
    return datetime.now(UTC)
