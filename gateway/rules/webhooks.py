"""Webhook deliveries as the contract (and Standard Webhooks) fix them: signature, headers, retries. Pure.

signature = ``v1,`` + base64(HMAC-SHA256(key = the secret's bytes after ``whsec_``, base64-decoded,
                                          msg = "{webhook-id}.{webhook-timestamp}.{body}"))

A delivery attempt ends in one of four ways (:func:`judge`): delivered
(2xx), gone (410: the endpoint is disabled), retry after a delay, or given
up because the event has reached its maximum age.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import random
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Literal

__all__ = [
    "MAX_RETRY_S",
    "Attempt",
    "AttemptState",
    "Delivery",
    "Verdict",
    "decode_secret",
    "headers",
    "judge",
    "retry_after_s",
    "retry_delay_s",
    "signature",
    "too_old",
]

SECRET_PREFIX = "whsec_"
MAX_RETRY_S = 3600.0  # back-off doubles up to an hour
JITTER = 0.2  # each delay drawn within ±20 % so that many retries do not come back at once


def decode_secret(secret: str) -> bytes:
    """The key bytes of ``whsec_<base64>``; ValueError unless it holds 24 to 64 bytes."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError("must start with whsec_")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("must be whsec_ followed by base64") from None
    if not 24 <= len(key) <= 64:
        raise ValueError(f"must hold 24 to 64 random bytes, not {len(key)}")
    return key


def signature(key: bytes, msg_id: str, timestamp_s: int, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp_s}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def headers(key: bytes, msg_id: str, timestamp_s: int, body: bytes) -> dict[str, str]:
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp_s),
        "webhook-signature": signature(key, msg_id, timestamp_s, body),
        "content-type": "application/json",
    }


def retry_delay_s(attempts: int, first_s: float, rng: random.Random | None = None) -> float:
    """The wait after the `attempts`-th failed attempt: about `first_s`, doubling, never over an hour."""
    base = first_s * 2.0 ** min(max(attempts - 1, 0), 30)
    r: float = (rng or random).random()
    return min(MAX_RETRY_S, base * (1 + JITTER * (2 * r - 1)))


def retry_after_s(value: str | None, now_s: float) -> float | None:
    """A ``Retry-After`` header (seconds, or an HTTP date) as a wait in seconds; None if absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return 1e9 if len(value) > 9 else float(value)  # a receiver's number, whatever its size
    try:
        when = parsedate_to_datetime(value)
        if when.tzinfo is None:
            return None
        return max(0.0, when.timestamp() - now_s)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


Kind = Literal["delivered", "gone", "retry", "expired"]


@dataclass(frozen=True)
class Verdict:
    kind: Kind
    next_ms: int | None = None  # for a retry: when
    why: str = ""


def judge(
    status: int | None,
    retry_after: str | None,
    attempts: int,
    event_ms: int,
    now_ms: int,
    first_retry_s: float,
    max_age_s: float,
    rng: random.Random | None = None,
) -> Verdict:
    """What to do after the `attempts`-th attempt answered `status` (None: no answer in time).

    Retries go on until the event is `max_age_s` old: the last one is made at that age, whatever the
    back-off or ``Retry-After`` would have asked. ``Retry-After`` is honoured on 429 and 503, but never
    sooner than `first_retry_s`: a receiver answering ``Retry-After: 0`` must not get a request loop.
    """
    if status is not None and 200 <= status < 300:
        return Verdict("delivered")
    if status == 410:
        return Verdict("gone", why="410 Gone")
    why = "no answer" if status is None else f"HTTP {status}"
    deadline = event_ms + int(max_age_s * 1000)
    if now_ms >= deadline:
        return Verdict("expired", why=why)
    wait = retry_delay_s(attempts, first_retry_s, rng)
    if status in (429, 503):
        asked = retry_after_s(retry_after, now_ms / 1000)
        if asked is not None:
            wait = max(asked, first_retry_s)
    return Verdict("retry", min(now_ms + int(wait * 1000), deadline), why)


# The last retry is due at the maximum age exactly; it may leave this much later and still be made.
LAST_TRY_SLACK_MS = 10_000


def too_old(event_ms: int, now_ms: int, max_age_s: float) -> bool:
    """Past its maximum age: given up without another attempt (found after an outage or a restart)."""
    return now_ms > event_ms + int(max_age_s * 1000) + LAST_TRY_SLACK_MS


@dataclass(frozen=True)
class Delivery:
    """One event on its way to one endpoint, as the outbox keeps it."""

    event_id: str
    endpoint: str  # the endpoint's URL
    attempts: int  # made so far
    due_ms: int
    event_ms: int
    body: bytes


AttemptState = Literal["pending", "delivered", "expired", "gone", "dropped"]


@dataclass(frozen=True)
class Attempt:
    """What became of a delivery: tried again at `due_ms` (``pending``), or finished for good."""

    event_id: str
    endpoint: str
    attempts: int
    state: AttemptState
    due_ms: int
    at_ms: int
    error: str = ""
