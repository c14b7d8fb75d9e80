"""The webhook signing and verification helper (no sockets)."""

from __future__ import annotations

import pytest

from dispatchd.webhooks import (
    Replayed,
    VerificationError,
    Verifier,
    new_secret,
    secret_key,
    signature,
    signed_headers,
)

# The test vector published with the Standard Webhooks specification.
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TIMESTAMP = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_signature_matches_the_published_vector() -> None:
    assert signature(secret_key(SPEC_SECRET), SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY) == SPEC_SIGNATURE


def test_verifier_accepts_the_published_vector_at_its_time() -> None:
    verifier = Verifier(SPEC_SECRET, clock=lambda: SPEC_TIMESTAMP + 10)
    headers = {"webhook-id": SPEC_ID, "webhook-timestamp": str(SPEC_TIMESTAMP),
               "webhook-signature": f"v1,bm90IGl0 {SPEC_SIGNATURE}"}  # any listed one may match
    assert verifier.verify(SPEC_BODY, headers) == {"test": 2432232314}


def test_stale_or_future_timestamps_are_refused() -> None:
    secret = new_secret()
    body = b'{"a":1}'
    headers = signed_headers(secret_key(secret), "m1", body, timestamp=1000)
    for now in (1000 + 301, 1000 - 301):
        with pytest.raises(VerificationError, match="tolerance"):
            Verifier(secret, clock=lambda now=now: now).verify(body, headers)


def test_a_replayed_id_is_refused_until_forgotten() -> None:
    secret = new_secret()
    verifier = Verifier(secret, clock=lambda: 5000)
    body = b"{}"
    first = signed_headers(secret_key(secret), "m1", body, timestamp=5000)
    verifier.verify(body, first)
    again = signed_headers(secret_key(secret), "m1", body, timestamp=5001)
    with pytest.raises(Replayed):
        verifier.verify(body, again)
    verifier.forget("m1")
    assert verifier.verify(body, again) == {}


def test_tampered_body_wrong_secret_and_missing_headers_are_refused() -> None:
    secret = new_secret()
    headers = signed_headers(secret_key(secret), "m1", b'{"mw":1}', timestamp=7)
    verifier = Verifier(secret, clock=lambda: 7)
    with pytest.raises(VerificationError, match="no matching"):
        verifier.verify(b'{"mw":9}', headers)
    with pytest.raises(VerificationError, match="no matching"):
        Verifier(new_secret(), clock=lambda: 7).verify(b'{"mw":1}', headers)
    with pytest.raises(VerificationError, match="missing"):
        verifier.verify(b'{"mw":1}', {k: v for k, v in headers.items()
                                      if k != "webhook-signature"})


@pytest.mark.parametrize("bad", ["plain-secret", "whsec_not*base64", "whsec_c2hvcnQ="])
def test_malformed_secrets_are_refused_with_the_reason(bad: str) -> None:
    with pytest.raises(ValueError, match="webhook secret"):
        secret_key(bad)
