"""Unit tests for the pure parts of gateway.booking.dispatcher: build_command and parse_ack."""

from __future__ import annotations

import hashlib
import hmac
import re
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from gateway.errors import PayloadError
from gateway.rules.commands import Ack, build_command, parse_ack, rfc3339_ms
from gateway.signing import vehicle_key, verify

MASTER = "a-master-key-of-decent-length"
NOW = datetime(2026, 11, 26, 10, 0, 0, tzinfo=UTC)
RFC3339_MS_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def test_rfc3339_ms() -> None:
    assert rfc3339_ms(NOW) == "2026-11-26T10:00:00.000Z"
    assert rfc3339_ms(datetime(2026, 11, 26, 11, 0, 0, 123456, tzinfo=timezone(timedelta(hours=1)))) == (
        "2026-11-26T10:00:00.123Z"
    )


def test_build_command_contract_example() -> None:
    cid = "0b9c6a52-3c4e-4f4e-9a53-5f0e0f7c2a10"
    cmd = build_command(MASTER, "ZOE-017", "unlock", "R-000123", NOW, 30, command_id=cid)
    assert {k: v for k, v in cmd.items() if k != "signature"} == {
        "command_id": cid,
        "vehicle_id": "ZOE-017",
        "action": "unlock",
        "reservation_id": "R-000123",
        "issued_at": "2026-11-26T10:00:00.000Z",
        "expires_at": "2026-11-26T10:00:30.000Z",
    }
    key = hmac.new(MASTER.encode(), b"ZOE-017", hashlib.sha256).digest()
    msg = f"{cid}|ZOE-017|unlock|R-000123|2026-11-26T10:00:00.000Z|2026-11-26T10:00:30.000Z".encode()
    assert cmd["signature"] == hmac.new(key, msg, hashlib.sha256).hexdigest()


def test_build_command_operator_lock_with_null_reservation() -> None:
    cmd = build_command(MASTER, "KANGOO-03", "lock", None, NOW, 10, command_id="c1")
    assert cmd["reservation_id"] is None
    key = hmac.new(MASTER.encode(), b"KANGOO-03", hashlib.sha256).digest()
    msg = b"c1|KANGOO-03|lock||2026-11-26T10:00:00.000Z|2026-11-26T10:00:10.000Z"
    assert cmd["signature"] == hmac.new(key, msg, hashlib.sha256).hexdigest()


@pytest.mark.parametrize(
    ("lifetime", "expires"),
    [
        (10, "2026-11-26T10:00:10.000Z"),
        (0.25, "2026-11-26T10:00:00.250Z"),
        (300, "2026-11-26T10:05:00.000Z"),
        (86400, "2026-11-27T10:00:00.000Z"),
    ],
)
def test_expires_at_is_issued_at_plus_lifetime(lifetime: float, expires: str) -> None:
    cmd = build_command(MASTER, "ZOE-017", "unlock", "R-1", NOW, lifetime)
    assert cmd["issued_at"] == "2026-11-26T10:00:00.000Z"
    assert cmd["expires_at"] == expires


def test_times_are_utc_ms_z_whatever_the_input_zone() -> None:
    paris = datetime(2026, 11, 26, 11, 0, 0, 987654, tzinfo=timezone(timedelta(hours=1)))
    cmd = build_command(MASTER, "ZOE-017", "unlock", "R-1", paris, 10)
    assert cmd["issued_at"] == "2026-11-26T10:00:00.987Z"
    assert cmd["expires_at"] == "2026-11-26T10:00:10.987Z"
    assert RFC3339_MS_Z.match(cmd["issued_at"]) and RFC3339_MS_Z.match(cmd["expires_at"])


def test_generated_command_ids_are_unique_uuids() -> None:
    ids = {build_command(MASTER, "ZOE-017", "unlock", "R-1", NOW, 10)["command_id"] for _ in range(50)}
    assert len(ids) == 50
    for i in ids:
        assert str(uuid.UUID(i)) == i


def test_signature_verifies_with_the_car_key_only() -> None:
    cmd = build_command(MASTER, "ZOE-017", "unlock", "R-1", NOW, 10)
    assert verify(cmd, vehicle_key(MASTER, "ZOE-017"))
    assert not verify(cmd, vehicle_key(MASTER, "ZOE-018"))
    assert MASTER not in str(cmd)


def test_command_is_json_serialisable_with_exact_keys() -> None:
    import orjson

    cmd = build_command(MASTER, "ZOE-017", "unlock", None, NOW, 10)
    back = orjson.loads(orjson.dumps(cmd))
    assert back == cmd
    assert set(back) == {"command_id", "vehicle_id", "action", "reservation_id", "issued_at", "expires_at", "signature"}


# --- parse_ack ----------------------------------------------------------------------------------------


def test_an_ack_reason_loses_its_nul_so_the_audit_can_store_it() -> None:
    ack = parse_ack({"command_id": "c1", "status": "failed", "reason": "door\u0000_open"})
    assert ack.reason == "door_open"


def test_parse_ack_done() -> None:
    ack = parse_ack({"command_id": "c1", "status": "done", "ts": "2026-11-26T10:00:01Z", "locked": False})
    assert ack == Ack("c1", "done", None, False)


def test_parse_ack_rejected_with_reason() -> None:
    ack = parse_ack({"command_id": "c1", "status": "rejected", "reason": "expired", "ts": "x"})
    assert ack == Ack("c1", "rejected", "expired", None)


def test_parse_ack_failed_with_reason_and_extra_fields() -> None:
    ack = parse_ack({"command_id": "c1", "status": "failed", "reason": "door_open", "locked": True, "extra": [1]})
    assert ack == Ack("c1", "failed", "door_open", True)


def test_parse_ack_truncates_long_reason() -> None:
    assert parse_ack({"command_id": "c1", "status": "failed", "reason": "x" * 500}).reason == "x" * 100


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        ({"status": "done"}, "missing_field"),
        ({"command_id": "", "status": "done"}, "missing_field"),
        ({"command_id": 17, "status": "done"}, "missing_field"),
        ({"command_id": None, "status": "done"}, "missing_field"),
        ({"command_id": "c1"}, "bad_type"),
        ({"command_id": "c1", "status": "ok"}, "bad_type"),
        ({"command_id": "c1", "status": "DONE"}, "bad_type"),
        ({"command_id": "c1", "status": ["done"]}, "bad_type"),
        ({"command_id": "c1", "status": "failed", "reason": 3}, "bad_type"),
        ({"command_id": "c1", "status": "done", "locked": "false"}, "bad_type"),
        ({"command_id": "c1", "status": "done", "locked": 0}, "bad_type"),
    ],
)
def test_parse_ack_rejects(doc: dict[str, Any], reason: str) -> None:
    with pytest.raises(PayloadError) as ei:
        parse_ack(doc)
    assert ei.value.reason == reason


def test_an_ack_for_no_waiting_command_is_counted_not_rejected() -> None:
    from gateway.booking.dispatcher import CommandDispatcher

    d = CommandDispatcher(None, None, "master-key", "fleet", timeout_s=1)  # type: ignore[arg-type]
    d.on_ack("ZOE-001", {"command_id": "late-one", "status": "done"}, 0)  # late: its caller got 504 already
    assert d.unmatched_acks == 1
