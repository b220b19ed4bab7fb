"""Unit tests for gateway.signing: vehicle keys and command signatures exactly as the contract fixes them."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import pytest

from gateway.signing import SIGNED_FIELDS, sign, signing_string, vehicle_key, verify

MASTER = "a-master-key-of-decent-length"
CMD: dict[str, Any] = {
    "command_id": "0b9c6a52-3c4e-4f4e-9a53-5f0e0f7c2a10",
    "vehicle_id": "ZOE-017",
    "action": "unlock",
    "reservation_id": "R-000123",
    "issued_at": "2026-11-26T10:00:00.000Z",
    "expires_at": "2026-11-26T10:00:30.000Z",
}


def independent_signature(master: str, cmd: dict[str, Any]) -> str:
    """The contract, re-implemented here with nothing from the gateway."""
    key = hmac.new(master.encode("utf-8"), cmd["vehicle_id"].encode("utf-8"), hashlib.sha256).digest()
    rid = cmd["reservation_id"] if cmd["reservation_id"] is not None else ""
    msg = "|".join(
        [cmd["command_id"], cmd["vehicle_id"], cmd["action"], rid, cmd["issued_at"], cmd["expires_at"]]
    ).encode("utf-8")
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def test_vehicle_key_is_raw_hmac_of_vehicle_id() -> None:
    key = vehicle_key(MASTER, "ZOE-017")
    assert isinstance(key, bytes) and len(key) == 32
    assert key == hmac.new(MASTER.encode(), b"ZOE-017", hashlib.sha256).digest()
    # not the hex form, not the reverse argument order
    assert key != hmac.new(b"ZOE-017", MASTER.encode(), hashlib.sha256).digest()


def test_vehicle_key_pinned_value() -> None:
    # HMAC-SHA256(key=b"master", msg=b"ZOE-017"), computed once with hmac/hashlib
    expected = hmac.new(b"master", b"ZOE-017", hashlib.sha256).hexdigest()
    assert vehicle_key("master", "ZOE-017").hex() == expected


def test_vehicle_keys_differ_per_car_and_per_master() -> None:
    assert vehicle_key(MASTER, "ZOE-017") != vehicle_key(MASTER, "ZOE-018")
    assert vehicle_key(MASTER, "ZOE-017") != vehicle_key(MASTER + "x", "ZOE-017")


def test_vehicle_key_uses_utf8() -> None:
    assert vehicle_key("clé", "ZOE-017") == hmac.new("clé".encode(), b"ZOE-017", hashlib.sha256).digest()


def test_signing_string_is_the_pipe_string() -> None:
    assert signing_string(CMD) == (
        b"0b9c6a52-3c4e-4f4e-9a53-5f0e0f7c2a10|ZOE-017|unlock|R-000123"
        b"|2026-11-26T10:00:00.000Z|2026-11-26T10:00:30.000Z"
    )


def test_signing_string_null_reservation_is_empty() -> None:
    cmd = {**CMD, "action": "lock", "reservation_id": None}
    assert signing_string(cmd) == (
        b"0b9c6a52-3c4e-4f4e-9a53-5f0e0f7c2a10|ZOE-017|lock||2026-11-26T10:00:00.000Z|2026-11-26T10:00:30.000Z"
    )


def test_signing_string_ignores_signature_and_extra_fields() -> None:
    assert signing_string({**CMD, "signature": "ab", "extra": 1}) == signing_string(CMD)


def test_signed_fields_order() -> None:
    assert SIGNED_FIELDS == ("command_id", "vehicle_id", "action", "reservation_id", "issued_at", "expires_at")


def test_signature_matches_independent_implementation() -> None:
    sig = sign(CMD, vehicle_key(MASTER, "ZOE-017"))
    assert sig == independent_signature(MASTER, CMD)
    assert len(sig) == 64 and sig == sig.lower()
    int(sig, 16)


def test_signature_with_null_reservation_matches_independent_implementation() -> None:
    cmd = {**CMD, "action": "lock", "reservation_id": None}
    assert sign(cmd, vehicle_key(MASTER, "ZOE-017")) == independent_signature(MASTER, cmd)


def test_verify_accepts_a_signed_command() -> None:
    key = vehicle_key(MASTER, "ZOE-017")
    assert verify({**CMD, "signature": sign(CMD, key)}, key)
    assert verify({**CMD, "signature": independent_signature(MASTER, CMD)}, key)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("command_id", "0b9c6a52-3c4e-4f4e-9a53-5f0e0f7c2a11"),
        ("vehicle_id", "ZOE-018"),
        ("action", "lock"),
        ("reservation_id", "R-000124"),
        ("reservation_id", None),
        ("reservation_id", ""),  # still verifies: null and "" sign the same, by the contract's own rule
        ("issued_at", "2026-11-26T10:00:00.001Z"),
        ("expires_at", "2026-11-26T10:05:30.000Z"),
    ],
)
def test_verify_rejects_tampering_with_each_signed_field(field: str, value: Any) -> None:
    key = vehicle_key(MASTER, "ZOE-017")
    signed = {**CMD, "signature": sign(CMD, key)}
    tampered = {**signed, field: value}
    if field == "reservation_id" and value == "":
        # "" and None are indistinguishable in the signed string; a real tampering is from R-000123 to either
        assert not verify(tampered, key)
        assert verify({**tampered, "signature": sign({**CMD, "reservation_id": None}, key)}, key)
    else:
        assert not verify(tampered, key)


def test_verify_rejects_field_shift_across_the_separator() -> None:
    # moving characters between adjacent fields must not keep the signature valid unless the string is equal
    key = vehicle_key(MASTER, "ZOE-017")
    signed = {**CMD, "signature": sign(CMD, key)}
    assert not verify({**signed, "reservation_id": "R-000123|x"}, key)


def test_verify_rejects_wrong_key_and_bad_signatures() -> None:
    key = vehicle_key(MASTER, "ZOE-017")
    sig = sign(CMD, key)
    assert not verify({**CMD, "signature": sig}, vehicle_key(MASTER, "ZOE-018"))
    assert not verify({**CMD, "signature": sig}, vehicle_key("other-master-key", "ZOE-017"))
    assert not verify({**CMD, "signature": sig.upper()}, key)
    assert not verify({**CMD, "signature": sig[:-1]}, key)
    assert not verify({**CMD, "signature": ""}, key)
    assert not verify(CMD, key)  # no signature at all
    assert not verify({**CMD, "signature": None}, key)
    assert not verify({**CMD, "signature": bytes.fromhex(sig)}, key)


def test_verify_refuses_a_non_ascii_signature_instead_of_raising() -> None:
    assert verify({"command_id": "c", "signature": "é" * 64}, b"k" * 32) is False
