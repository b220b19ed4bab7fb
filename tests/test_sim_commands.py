"""Unit tests of the car-side command verification, the key file and the MQTT packet framing."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest

from device_sim.commands import SeenCommands, ack_payload, load_key_file, parse_command, parse_time, verify_command
from device_sim.mqtt import Will, encode_connect, encode_publish
from device_sim.mqtt_codec import decode_packets
from device_sim.physics import rfc3339_ms
from gateway.signing import sign, vehicle_key

MASTER = "unit-test-master-key-0123456789"
NOW = 1795683600.0


def command(
    vid: str = "ZOE-017", *, key_for: str | None = None, expires_in: float = 30.0, **over: Any
) -> dict[str, Any]:
    cmd: dict[str, Any] = {
        "command_id": str(uuid.uuid4()),
        "vehicle_id": vid,
        "action": "unlock",
        "reservation_id": "R-000123",
        "issued_at": rfc3339_ms(NOW),
        "expires_at": rfc3339_ms(NOW + expires_in),
    }
    cmd.update(over)
    cmd["signature"] = sign(cmd, vehicle_key(MASTER, vid))
    return cmd


KEY = vehicle_key(MASTER, "ZOE-017")


def test_a_correct_command_is_accepted() -> None:
    v = verify_command(command(), "ZOE-017", KEY, NOW, SeenCommands())
    assert (v.ok, v.reason, v.action) == (True, None, "unlock")


def test_an_operator_lock_without_reservation_is_accepted() -> None:
    v = verify_command(command(action="lock", reservation_id=None), "ZOE-017", KEY, NOW, SeenCommands())
    assert v.ok and v.action == "lock"


def test_a_tampered_field_breaks_the_signature() -> None:
    cmd = command()
    cmd["action"] = "lock"
    assert verify_command(cmd, "ZOE-017", KEY, NOW, SeenCommands()).reason == "bad_signature"


def test_a_signature_with_another_key_is_bad() -> None:
    cmd = command()
    cmd["signature"] = sign(cmd, vehicle_key("some-other-master-key", "ZOE-017"))
    assert verify_command(cmd, "ZOE-017", KEY, NOW, SeenCommands()).reason == "bad_signature"


def test_without_a_key_every_command_is_bad_signature() -> None:
    assert verify_command(command(), "ZOE-017", None, NOW, SeenCommands()).reason == "bad_signature"


def test_a_command_for_another_vehicle_is_wrong_vehicle_even_if_signed_for_it() -> None:
    cmd = command("ZOE-018")  # correctly signed with ZOE-018's key
    assert verify_command(cmd, "ZOE-017", KEY, NOW, SeenCommands()).reason == "wrong_vehicle"


def test_an_expired_command_is_refused() -> None:
    v = verify_command(command(expires_in=-1.0), "ZOE-017", KEY, NOW, SeenCommands())
    assert v.reason == "expired"
    assert verify_command(command(expires_in=0.5), "ZOE-017", KEY, NOW, SeenCommands()).ok


def test_an_unparseable_expiry_counts_as_expired() -> None:
    assert verify_command(command(expires_at="soon"), "ZOE-017", KEY, NOW, SeenCommands()).reason == "expired"


def test_a_replay_is_a_duplicate_but_a_forgery_does_not_burn_the_id() -> None:
    seen = SeenCommands()
    cmd = command()
    forged = dict(cmd, signature="00" * 32)
    assert verify_command(forged, "ZOE-017", KEY, NOW, seen).reason == "bad_signature"
    assert verify_command(cmd, "ZOE-017", KEY, NOW, seen).ok
    assert verify_command(cmd, "ZOE-017", KEY, NOW, seen).reason == "duplicate"


def test_seen_commands_forget_the_oldest() -> None:
    seen = SeenCommands(size=2)
    for cid in ("a", "b", "c"):
        seen.add(cid)
    assert "a" not in seen and "b" in seen and "c" in seen


def test_parse_command_needs_a_json_object_with_a_command_id() -> None:
    assert parse_command(b"{not json") is None
    assert parse_command(b"[1]") is None
    assert parse_command(b'{"command_id": 5}') is None
    assert parse_command(b'{"command_id": "x"}') == {"command_id": "x"}


def test_parse_time_takes_rfc3339_and_epoch_ms() -> None:
    assert parse_time("2026-11-26T09:00:00.123Z") == pytest.approx(1795683600.123)
    assert parse_time("2026-11-26T10:00:00+01:00") == pytest.approx(1795683600.0)
    assert parse_time(1795683600123) == pytest.approx(1795683600.123)
    assert parse_time("2026-11-26T09:00:00") is None  # no offset: ambiguous
    assert parse_time(True) is None


def test_ack_payloads_follow_the_contract() -> None:
    assert orjson.loads(ack_payload("c1", "done", "T", locked=False)) == {
        "command_id": "c1", "status": "done", "ts": "T", "locked": False
    }  # fmt: skip
    assert orjson.loads(ack_payload("c1", "rejected", "T", reason="expired")) == {
        "command_id": "c1", "status": "rejected", "reason": "expired", "ts": "T"
    }  # fmt: skip


def test_key_file_maps_vehicles_to_their_own_keys() -> None:
    text = f"# provisioned keys\nZOE-017 {KEY.hex()}\nZOE-018={vehicle_key(MASTER, 'ZOE-018').hex()}  # second\n"
    keys = load_key_file(text)
    assert keys == {"ZOE-017": KEY, "ZOE-018": vehicle_key(MASTER, "ZOE-018")}
    assert load_key_file(KEY.hex()) == {"*": KEY}
    with pytest.raises(ValueError, match="32 bytes"):
        load_key_file("ZOE-017 abcd")
    with pytest.raises(ValueError, match="line 1"):
        load_key_file("ZOE-017 not-hex")


def test_packet_framing_round_trips_and_keeps_partial_packets() -> None:
    big = b"x" * 300  # needs a two-byte remaining length
    stream = bytearray(
        encode_publish("fleet/ZOE-017/battery", big, 1, False, 7) + encode_publish("a/b", b"{}", 0, True, 0)
    )
    tail = stream[-3:]
    buf = bytearray(stream[:-3])
    packets = decode_packets(buf)
    assert len(packets) == 1 and packets[0][0] == 0x32  # PUBLISH, QoS 1
    assert packets[0][1].endswith(big) and b"fleet/ZOE-017/battery" in packets[0][1]
    buf += tail
    assert decode_packets(buf) == [(0x31, b"\x00\x03a/b{}")] and not buf


def test_connect_carries_the_retained_will() -> None:
    pkt = encode_connect("sim-ZOE-017", 60, True, Will("fleet/ZOE-017/status", b'{"online": false}'))
    assert pkt[0] == 0x10 and b"MQTT\x04" in pkt
    flags = pkt[pkt.index(b"MQTT\x04") + 5]
    assert flags == 0x02 | 0x04 | (1 << 3) | 0x20  # clean, will, will QoS 1, will retain
    assert pkt.endswith(b'fleet/ZOE-017/status\x00\x11{"online": false}')
