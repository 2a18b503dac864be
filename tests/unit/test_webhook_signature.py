"""The webhook signature against the README's contract, not against the product's own ``verify``.

README "Webhooks": ``X-Kubemta-Signature: sha256=HEX``, the HMAC-SHA256 of
``TIMESTAMP + "." + BODY`` with the endpoint's secret.  The expected value
below is a literal, computed once with the standard library's ``hmac`` from
the key, timestamp and body written here, and computed again in the test.
"""

from __future__ import annotations

import hashlib
import hmac

from mta.obs.webhooks import sign, verify

KEY = b"whsec-7f3a-fixed-test-key"
TIMESTAMP = "1767225600"
BODY = b'{"event":"delivered","id":"01JGQ6Y1ZP0000000000000000","queue_id":"01JGQ6Y1ZP8Q3X"}'
EXPECTED = "sha256=64ebc8b17b3fe034c501370d436e261d55b7a37b8e7e76edf51806e30612d6a8"


def test_the_literal_is_hmac_sha256_of_timestamp_dot_body() -> None:
    digest = hmac.new(KEY, TIMESTAMP.encode("ascii") + b"." + BODY, hashlib.sha256).hexdigest()
    assert f"sha256={digest}" == EXPECTED


def test_sign_produces_exactly_the_fixed_vector() -> None:
    assert sign(KEY, TIMESTAMP, BODY) == EXPECTED


def test_the_vector_changes_with_each_part() -> None:
    assert sign(KEY, "1767225601", BODY) != EXPECTED
    assert sign(KEY, TIMESTAMP, BODY + b" ") != EXPECTED
    assert sign(KEY + b"x", TIMESTAMP, BODY) != EXPECTED
    # The "." separates the two: moving a character across it changes the signature.
    assert sign(KEY, TIMESTAMP[:-1], TIMESTAMP[-1:].encode() + BODY) != EXPECTED


def test_verify_accepts_the_vector_and_nothing_else() -> None:
    assert verify(KEY, TIMESTAMP, BODY, EXPECTED)
    assert not verify(KEY, TIMESTAMP, BODY, EXPECTED.upper())
    assert not verify(KEY, TIMESTAMP, BODY, EXPECTED.removeprefix("sha256="))
    assert not verify(KEY, TIMESTAMP, BODY, EXPECTED[:-1] + "0")
