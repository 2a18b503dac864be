"""A JSON submission (``POST /v1/messages``) built into a MIME message with ``email``.

Owns the request's shape: ``from``, ``to``/``cc``/``bcc``, ``subject``,
``text``, ``html``, ``attachments`` (``filename``, ``content_type``,
``content`` in base64) and extra ``headers``.  Bcc recipients are in the
envelope only.  The message is rendered with CRLF line ends and 7-bit safe
encodings (quoted-printable or base64), so it travels to any receiver
unchanged; attachments are base64 and arrive byte for byte.

Failure: ``ApiError`` 400 with a code naming what is wrong
(``invalid_json``, ``missing_field``, ``invalid_field``,
``invalid_attachment``); address syntax is left to the envelope checks.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.utils import getaddresses
from typing import Any

from mta.api.errors import ApiError, bad_request

# Headers the builder sets itself or that only the MTA may write.
_RESERVED = {"from", "to", "cc", "bcc", "subject", "content-type", "content-transfer-encoding", "mime-version",
             "received", "authentication-results", "return-path"}
_HEADER_NAME = re.compile(r"^[!-9;-~]{1,76}$")  # RFC 5322 ftext
_CONTENT_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*$")
_RENDER = policy.SMTP.clone(cte_type="7bit")  # CRLF, and nothing that needs 8BITMIME


@dataclass(frozen=True)
class Composed:
    sender: str
    recipients: list[str]
    data: bytes


def _text(body: dict[str, Any], key: str, *, required: bool = False) -> str | None:
    value = body.get(key)
    if value is None:
        if required:
            raise bad_request("missing_field", f"{key!r} is required")
        return None
    if not isinstance(value, str):
        raise bad_request("invalid_field", f"{key!r} must be a string")
    if key in ("from", "subject") and ("\r" in value or "\n" in value):
        raise bad_request("invalid_field", f"{key!r} must be on one line")
    return value


def _addresses(body: dict[str, Any], key: str) -> list[str]:
    value = body.get(key, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise bad_request("invalid_field", f"{key!r} must be an address or a list of addresses")
    if any("\r" in item or "\n" in item for item in value):
        raise bad_request("invalid_field", f"{key!r}: an address must be on one line")
    return value


def _bare(values: list[str], key: str) -> list[str]:
    found = [address for _, address in getaddresses(values)]
    if len(found) != len(values) or not all(found):
        raise ApiError(400, "invalid_address", "5.1.3", f"{key!r}: not an address: {values!r}")
    return found


def _attach(message: EmailMessage, item: Any, number: int) -> None:
    where = f"attachments[{number}]"
    if not isinstance(item, dict):
        raise bad_request("invalid_attachment", f"{where} must be an object")
    filename, content_type, content = item.get("filename"), item.get("content_type",
                                                                     "application/octet-stream"), item.get("content")
    if not isinstance(filename, str) or not filename or "\r" in filename or "\n" in filename:
        raise bad_request("invalid_attachment", f"{where}.filename must be a non-empty string on one line")
    if not isinstance(content_type, str) or not _CONTENT_TYPE.match(content_type):
        raise bad_request("invalid_attachment", f"{where}.content_type must be a MIME type like 'text/csv'")
    if not isinstance(content, str):
        raise bad_request("invalid_attachment", f"{where}.content must be a base64 string")
    try:
        data = base64.b64decode(content, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("invalid_attachment", f"{where}.content is not valid base64") from None
    maintype, subtype = content_type.split("/", 1)
    # Bytes, also for text/*: the receiver gets exactly these octets.
    message.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)


def compose(body: Any) -> Composed:
    if not isinstance(body, dict):
        raise bad_request("invalid_json", "the body must be a JSON object")
    sender_field = _text(body, "from", required=True)
    assert sender_field is not None
    to, cc, bcc = (_addresses(body, key) for key in ("to", "cc", "bcc"))
    if not (to or cc or bcc):
        raise bad_request("missing_field", "at least one of 'to', 'cc', 'bcc' is required")
    sender = _bare([sender_field], "from")[0]
    recipients = _bare(to, "to") + _bare(cc, "cc") + _bare(bcc, "bcc")
    subject, text, html = _text(body, "subject"), _text(body, "text"), _text(body, "html")
    if text is None and html is None:
        raise bad_request("missing_field", "'text' or 'html' is required")
    message = EmailMessage(policy=_RENDER)
    try:
        message["From"] = sender_field
        if to:
            message["To"] = ", ".join(to)
        if cc:
            message["Cc"] = ", ".join(cc)
        if subject is not None:
            message["Subject"] = subject
        _extra_headers(message, body.get("headers", {}))
    except (ValueError, TypeError) as exc:
        raise bad_request("invalid_field", f"a header cannot be built: {exc}") from None
    if text is not None:
        message.set_content(text)
        if html is not None:
            message.add_alternative(html, subtype="html")
    else:
        message.set_content(html, subtype="html")
    attachments = body.get("attachments", [])
    if not isinstance(attachments, list):
        raise bad_request("invalid_attachment", "'attachments' must be a list")
    for number, item in enumerate(attachments):
        _attach(message, item, number)
    return Composed(sender, recipients, message.as_bytes(policy=_RENDER))


def _extra_headers(message: EmailMessage, headers: Any) -> None:
    if not isinstance(headers, dict):
        raise bad_request("invalid_field", "'headers' must be an object of name: value")
    for name, value in headers.items():
        if not _HEADER_NAME.match(name) or name.lower() in _RESERVED:
            raise bad_request("invalid_field", f"header {name!r} cannot be set (reserved or not a header name)")
        if not isinstance(value, str) or "\r" in value or "\n" in value:
            raise bad_request("invalid_field", f"header {name!r} must be a string on one line")
        message[name] = value

