"""Signing and verifying webhooks per the Standard Webhooks scheme.

dispatchd signs every webhook it sends; FSPs can use :class:`Verifier` (this module needs
only the standard library) to check what they receive::

    verifier = Verifier(os.environ["FLEXOPS_WEBHOOK_SECRET"])
    try:
        event = verifier.verify(body, headers)      # raw body bytes, the request headers
    except Replayed:
        return 200        # already received and processed: answer 2xx, act on nothing
    except VerificationError as exc:
        return 400        # forged, stale or malformed: exc.reason says which
    ...                   # act on ``event``; if that fails, call verifier.forget(msg_id)
                          # and answer 5xx, so the retry is not taken for a replay

The scheme (https://www.standardwebhooks.com/): headers ``webhook-id`` (the same on every
retry of one message), ``webhook-timestamp`` (Unix seconds of this attempt) and
``webhook-signature`` (space-separated ``v1,<base64>`` entries), where the signature is
base64 of HMAC-SHA256 over ``{id}.{timestamp}.{body}`` keyed with the secret's bytes. A
secret is written ``whsec_`` followed by the base64 of its bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

PREFIX = "whsec_"
DEFAULT_TOLERANCE_S = 300


class VerificationError(Exception):
    """A webhook that must not be trusted; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class Replayed(VerificationError):
    """A correctly signed message whose id was already accepted (a retry or a replay)."""


def new_secret() -> str:
    """A fresh secret in the ``whsec_`` form (32 random bytes)."""
    return PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def secret_key(secret: str) -> bytes:
    """The key bytes of a ``whsec_`` secret; raises ValueError for anything else."""
    if not secret.startswith(PREFIX):
        raise ValueError("a webhook secret starts with 'whsec_'")
    try:
        key = base64.b64decode(secret[len(PREFIX):], validate=True)
    except binascii.Error as exc:
        raise ValueError("a webhook secret is 'whsec_' followed by base64") from exc
    if len(key) < 16:
        raise ValueError("a webhook secret needs at least 16 bytes of key")
    return key


def signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value for one attempt of one message."""
    signed = msg_id.encode() + b"." + str(timestamp).encode() + b"." + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(key: bytes, msg_id: str, body: bytes, *, timestamp: int | None = None
                   ) -> dict[str, str]:
    """The three Standard Webhooks headers for sending ``body`` now (or at ``timestamp``)."""
    ts = int(time.time()) if timestamp is None else timestamp
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": signature(key, msg_id, ts, body),
    }


class Verifier:
    """Checks signature, timestamp and id of received webhooks for one secret.

    ``tolerance_s`` bounds how far the timestamp may be from ``clock()`` either way. Ids
    accepted within that window are remembered (at most ``remember`` of them), so a copy of
    a message captured and sent again is refused with :class:`Replayed`; older copies fail
    the timestamp check instead.
    """

    def __init__(self, secret: str, *, tolerance_s: float = DEFAULT_TOLERANCE_S,
                 remember: int = 100_000, clock: Callable[[], float] = time.time) -> None:
        self._key = secret_key(secret)
        self._tolerance = tolerance_s
        self._remember = remember
        self._clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()

    def verify(self, body: bytes, headers: Mapping[str, str]) -> Any:
        """The parsed JSON body if the message is authentic, fresh and new; else raises."""
        lowered = {k.lower(): v for k, v in headers.items()}
        msg_id = lowered.get("webhook-id")
        stamp = lowered.get("webhook-timestamp")
        given = lowered.get("webhook-signature")
        if not msg_id or not stamp or not given:
            raise VerificationError("missing webhook-id, webhook-timestamp or webhook-signature")
        try:
            timestamp = int(stamp)
        except ValueError:
            raise VerificationError(f"webhook-timestamp {stamp!r} is not an integer") from None
        now = self._clock()
        if abs(now - timestamp) > self._tolerance:
            raise VerificationError(
                f"webhook-timestamp is {now - timestamp:+.0f} s from now "
                f"(tolerance {self._tolerance:.0f} s)")
        expected = signature(self._key, msg_id, timestamp, body).encode()
        if not any(hmac.compare_digest(expected, candidate.encode())
                   for candidate in given.split()):
            raise VerificationError("no matching v1 signature")
        self._expire(now)
        if msg_id in self._seen:
            raise Replayed(f"message {msg_id} was already received")
        self._seen[msg_id] = now
        while len(self._seen) > self._remember:
            self._seen.popitem(last=False)
        try:
            return json.loads(body)
        except ValueError as exc:
            raise VerificationError(f"the body is not JSON: {exc}") from None

    def forget(self, msg_id: str) -> None:
        """Let ``msg_id`` be accepted again (call when processing it failed)."""
        self._seen.pop(msg_id, None)

    def _expire(self, now: float) -> None:
        while self._seen:
            oldest, at = next(iter(self._seen.items()))
            if now - at <= self._tolerance * 2:
                break
            del self._seen[oldest]
