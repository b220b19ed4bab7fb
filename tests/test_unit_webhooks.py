"""Webhook signatures, retry decisions, event ids and the webhook settings. Pure, no network."""

from __future__ import annotations

import base64
import random
from datetime import UTC, datetime
from email.utils import format_datetime

import orjson
import pytest

from device_sim.receiver import BadSignature, verify
from gateway.errors import ConfigError
from gateway.ids import EVENT_ID
from gateway.rules.events import UlidSource, make_event, wanted_by
from gateway.rules.webhooks import (
    MAX_RETRY_S,
    Verdict,
    decode_secret,
    headers,
    judge,
    retry_after_s,
    retry_delay_s,
    signature,
    too_old,
)
from gateway.settings_source import load_settings

# The test vector published by Standard Webhooks (standard-webhooks/standard-webhooks, spec and libraries).
STD_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
STD_ID, STD_TS, STD_BODY = "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}'
STD_SIG = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_the_signature_is_standard_webhooks_own_test_vector() -> None:
    assert signature(decode_secret(STD_SECRET), STD_ID, STD_TS, STD_BODY) == STD_SIG


def test_the_receiver_accepts_what_the_gateway_signs_and_nothing_else() -> None:
    key = decode_secret(STD_SECRET)
    body = orjson.dumps({"id": STD_ID, "type": "alert.opened", "timestamp": "x", "data": {}})
    h = headers(key, STD_ID, STD_TS, body)
    assert h["content-type"] == "application/json" and h["webhook-id"] == STD_ID
    assert verify(STD_SECRET, h, body, now_s=STD_TS + 10)["id"] == STD_ID
    with pytest.raises(BadSignature, match="no signature"):
        verify(STD_SECRET, h, body + b" ", now_s=STD_TS)
    with pytest.raises(BadSignature, match="off"):
        verify(STD_SECRET, h, body, now_s=STD_TS + 301)  # a replay, five minutes later
    rotated = {**h, "webhook-signature": "v1,AAAA " + h["webhook-signature"]}
    assert verify(STD_SECRET, rotated, body, now_s=STD_TS)["id"] == STD_ID


@pytest.mark.parametrize(
    ("secret", "why"),
    [
        ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_"),
        ("whsec_not base64!", "base64"),
        ("whsec_" + base64.b64encode(b"x" * 23).decode(), "24 to 64"),
        ("whsec_" + base64.b64encode(b"x" * 65).decode(), "24 to 64"),
    ],
)
def test_a_bad_secret_is_refused(secret: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        decode_secret(secret)


def test_retries_double_from_the_first_with_jitter_up_to_an_hour() -> None:
    rng = random.Random(1)
    for attempts, base in [(1, 5.0), (2, 10.0), (3, 20.0), (11, MAX_RETRY_S), (40, MAX_RETRY_S)]:
        for _ in range(50):
            assert 0.8 * base <= retry_delay_s(attempts, 5.0, rng) <= min(1.2 * base, MAX_RETRY_S)


def test_retry_after_in_seconds_or_as_a_date() -> None:
    now = 1_795_683_600.0
    assert retry_after_s("120", now) == 120.0
    date = format_datetime(datetime.fromtimestamp(now + 30, UTC), usegmt=True)
    assert retry_after_s(date, now) == pytest.approx(30.0)
    assert retry_after_s("soon", now) is None and retry_after_s(None, now) is None


NOW_MS = 1_795_683_600_000


def test_what_each_answer_means() -> None:
    def j(status: int | None, ra: str | None = None, age_s: float = 0) -> Verdict:
        return judge(status, ra, 1, NOW_MS - int(age_s * 1000), NOW_MS, 5.0, 86400, random.Random(0))

    assert j(200).kind == "delivered" and j(204).kind == "delivered"
    assert j(410).kind == "gone"
    for status in (500, 404, 301, None):
        v = j(status)
        assert v.kind == "retry" and v.next_ms is not None and 4000 <= v.next_ms - NOW_MS <= 6000
    assert (v := j(429, "60")).kind == "retry" and v.next_ms == NOW_MS + 60_000
    assert (v := j(503, "7")).next_ms == NOW_MS + 7_000
    assert (v := j(500, "60")).next_ms is not None and v.next_ms - NOW_MS < 10_000  # only on 429 and 503
    # Never sooner than the first retry, whatever Retry-After says: no request loop.
    assert (v := j(503, "0")).next_ms == NOW_MS + 5_000
    assert j(429, "Wed, 21 Oct 2015 07:28:00 GMT").next_ms == NOW_MS + 5_000
    # The last attempt is made at the maximum age, then it is given up.
    assert (v := j(500, age_s=86398)).kind == "retry" and v.next_ms == NOW_MS + 2_000
    assert j(429, "3600", age_s=86000).next_ms == NOW_MS + 400_000
    assert j(500, age_s=86400).kind == "expired"
    # Found later than its last retry was due (after a restart, say): given up without a try.
    assert too_old(NOW_MS - 86_410_001, NOW_MS, 86400) and not too_old(NOW_MS - 86_400_000, NOW_MS, 86400)


def test_event_ids_are_ulids_in_the_order_made() -> None:
    src = UlidSource()
    ids = [src.new(NOW_MS) for _ in range(1000)] + [src.new(NOW_MS - 5)] + [src.new(NOW_MS + 1)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)  # a clock stepping back does not reorder
    assert all(EVENT_ID.matches("evt_" + i) for i in ids)
    assert UlidSource().new(NOW_MS)[:10] == ids[0][:10]  # the time part: 48 bits of milliseconds


def test_an_event_is_its_json() -> None:
    e = make_event("evt_X", "trip.started", NOW_MS, {"vehicle_id": "ZOE-001"}, ["http://a/"])
    assert orjson.loads(e.body) == {
        "id": "evt_X",
        "type": "trip.started",
        "timestamp": "2026-11-26T09:00:00.000Z",
        "data": {"vehicle_id": "ZOE-001"},
    }
    assert e.targets == ("http://a/",)
    assert wanted_by(["*"], "trip.ended") and wanted_by(["trip.ended"], "trip.ended")
    assert not wanted_by(["alert.opened"], "trip.ended")


GOOD = "whsec_" + base64.b64encode(b"k" * 32).decode()


def test_endpoints_from_the_environment_as_json() -> None:
    env = {"GATEWAY__DEV_MODE": "true", "GATEWAY__WEBHOOKS__ENDPOINTS": f'[{{"url": "https://b.example/h", '
           f'"secret": "{GOOD}", "types": ["alert.opened", "alert.resolved"]}}]'}  # fmt: skip
    [ep] = load_settings(None, env).webhooks.endpoints
    assert ep.url == "https://b.example/h" and ep.types == ("alert.opened", "alert.resolved")


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("[{", "JSON"),
        (f'[{{"url": "ftp://x", "secret": "{GOOD}"}}]', "webhooks.endpoints.0.url"),
        ('[{"url": "http://x", "secret": "whsec_abc"}]', "base64"),
        (f'[{{"url": "http://x", "secret": "{GOOD}", "types": ["trip.exploded"]}}]', "not an event type"),
        (f'[{{"url": "http://x", "secret": "{GOOD}", "types": []}}]', "or"),
        (f'[{{"url": "http://x", "secret": "{GOOD}"}}, {{"url": "http://x", "secret": "{GOOD}"}}]', "twice"),
    ],
)
def test_bad_endpoints_stop_start_up_with_the_key_named(value: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why) as e:
        load_settings(None, {"GATEWAY__DEV_MODE": "true", "GATEWAY__WEBHOOKS__ENDPOINTS": value})
    assert str(e.value).startswith("webhooks.endpoints")


def test_deliveries_must_give_up_before_their_events_are_pruned() -> None:
    env = {"GATEWAY__DEV_MODE": "true", "GATEWAY__EVENTS__RETENTION_DAYS": "0.5"}
    with pytest.raises(ConfigError, match=r"^webhooks.max_age_s: longer than events.retention_days"):
        load_settings(None, env)
    assert load_settings(None, {**env, "GATEWAY__WEBHOOKS__MAX_AGE_S": "3600"}).webhooks.max_age_s == 3600


def test_an_absurd_retry_after_is_read_or_ignored_never_an_error() -> None:
    now = 1_795_683_600.0
    assert retry_after_s("9" * 5000, now) == 1e9
    assert retry_after_s("Mon, 01 Jan 99999999999999999999 00:00:00 GMT", now) is None
    assert retry_after_s("Mon, 01 Jan 1990 00:00:00", now) is None  # no zone
