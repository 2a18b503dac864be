"""The JSON-to-MIME builder of the HTTP API: what it refuses, with which code, and what it builds."""

from __future__ import annotations

import base64
import email
import email.policy
from typing import Any

import pytest

from mta.api.compose import compose
from mta.api.errors import ApiError

BASE: dict[str, Any] = {"from": "a@billing.test", "to": ["b@dest.test"], "text": "hi"}


@pytest.mark.parametrize(("body", "code"), [
    ([], "invalid_json"),
    ({"to": ["b@dest.test"], "text": "x"}, "missing_field"),
    ({**BASE, "to": []}, "missing_field"),
    ({"from": "a@billing.test", "to": "b@dest.test"}, "missing_field"),
    ({**BASE, "subject": "two\r\nBcc: evil@x.test"}, "invalid_field"),
    ({**BASE, "from": 7}, "invalid_field"),
    ({**BASE, "to": [7]}, "invalid_field"),
    ({**BASE, "to": ["b@dest.test\r\nX: y"]}, "invalid_field"),
    ({**BASE, "headers": {"Bcc": "x@y.test"}}, "invalid_field"),
    ({**BASE, "headers": {"Received": "forged"}}, "invalid_field"),
    ({**BASE, "headers": {"X-A": "one\nX-B: two"}}, "invalid_field"),
    ({**BASE, "headers": {"Bad Name": "v"}}, "invalid_field"),
    ({**BASE, "attachments": [{"filename": "a", "content": "not base64!"}]}, "invalid_attachment"),
    ({**BASE, "attachments": [{"content": "AAAA"}]}, "invalid_attachment"),
    ({**BASE, "attachments": [{"filename": "a", "content_type": "nonsense", "content": "AAAA"}]},
     "invalid_attachment"),
    ({**BASE, "attachments": {"filename": "a"}}, "invalid_attachment"),
    ({**BASE, "to": ["<>"]}, "invalid_address"),
])
def test_bad_submissions_are_refused_with_a_code(body: Any, code: str) -> None:
    with pytest.raises(ApiError) as caught:
        compose(body)
    assert (caught.value.status, caught.value.code) == (400, code)


def test_a_built_message_is_7bit_crlf_and_bcc_stays_in_the_envelope() -> None:
    data = bytes(range(256))
    built = compose({**BASE, "from": "Bill <bill@billing.test>", "cc": "c@dest.test", "bcc": ["d@dest.test"],
                     "subject": "Grüße", "html": "<b>ü</b>", "headers": {"X-Tag": "t"},
                     "attachments": [{"filename": "x.bin", "content": base64.b64encode(data).decode()}]})
    assert built.sender == "bill@billing.test"
    assert built.recipients == ["b@dest.test", "c@dest.test", "d@dest.test"]
    assert built.data.isascii() and b"\n" not in built.data.replace(b"\r\n", b"")
    parsed = email.message_from_bytes(built.data, policy=email.policy.default)
    assert parsed["Bcc"] is None and "d@dest.test" not in built.data.decode()
    assert parsed["Subject"] == "Grüße" and parsed["X-Tag"] == "t"
    [attachment] = parsed.iter_attachments()
    assert attachment.get_payload(decode=True) == data
    assert attachment.get_content_type() == "application/octet-stream"
