"""Car messages: topic parsing and payload validation. Pure functions, no I/O.

Every rule of the contract lives here: required fields, types, ranges,
timestamp forms and limits, the 16 KiB cap, the vehicle id in the payload
matching the topic. A broken rule raises :class:`PayloadError` whose
``reason`` is the label counted in metrics and stored in `rejected`.
Numbers are always stored as floats so that a car sending ``81`` once and
``81.5`` later never causes an InfluxDB field-type conflict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final

import orjson

from gateway.errors import PayloadError
from gateway.ids import VEHICLE_ID
from gateway.times import rfc3339_ms

KINDS: Final = ("battery", "location", "doors", "status")
ACK = "ack"
COMMANDS = "commands"

# kind -> (field, required, type, low, high). type: "num" | "bool" | "str".
_Spec = tuple[tuple[str, bool, str, float | None, float | None], ...]
SPECS: Final[dict[str, _Spec]] = {
    "battery": (
        ("soc_pct", True, "num", 0, 100),
        ("range_km", False, "num", 0, None),
        ("charging", False, "bool", None, None),
        ("plugged", False, "bool", None, None),
        ("temp_c", False, "num", -40, 85),
    ),
    "location": (
        ("lat", True, "num", -90, 90),
        ("lon", True, "num", -180, 180),
        ("speed_kmh", False, "num", 0, 250),
        ("heading_deg", False, "num", 0, 360),
        ("odometer_km", False, "num", 0, None),
    ),
    "doors": (
        ("locked", True, "bool", None, None),
        ("closed", False, "bool", None, None),
    ),
    "status": (
        ("online", True, "bool", None, None),
        ("firmware", False, "str", None, None),
    ),
}
# Fields kept in the latest state but not written to InfluxDB (the contract's schema has no column for them).
STATE_ONLY: Final = frozenset({"firmware"})
STORED: Final[dict[str, frozenset[str]]] = {
    kind: frozenset(name for name, *_ in spec if name not in STATE_ONLY) for kind, spec in SPECS.items()
}


@dataclass(frozen=True, slots=True)
class Topic:
    vehicle_id: str
    kind: str  # one of KINDS, "ack", "commands" (our own), or anything else (unknown)


def parse_topic(topic: str, prefix: str) -> Topic | None:
    """``fleet/ZOE-001/battery`` -> Topic("ZOE-001", "battery"); None if not under `prefix`."""
    if not topic.startswith(prefix) or topic[len(prefix) : len(prefix) + 1] != "/":
        return None
    rest = topic[len(prefix) + 1 :].split("/")
    if len(rest) == 2:
        return Topic(rest[0], rest[1] if rest[1] != ACK else "unknown")
    if len(rest) == 3 and rest[1] == COMMANDS and rest[2] == ACK:
        return Topic(rest[0], ACK)
    return Topic(rest[0] if rest else "", "unknown")


@dataclass(frozen=True, slots=True)
class Limits:
    max_payload_bytes: int = 16 * 1024
    max_age_ms: int = 7 * 24 * 3600 * 1000
    max_future_ms: int = 5 * 60 * 1000


@dataclass(frozen=True, slots=True)
class Reading:
    """One valid car message: what is stored and what the latest state keeps."""

    kind: str
    vehicle_id: str
    ts_ms: int
    fields: dict[str, Any]


def decode_object(payload: bytes | bytearray, limits: Limits) -> dict[str, Any]:
    """Size cap, UTF-8 and JSON object checks shared by telemetry and acks."""
    if len(payload) > limits.max_payload_bytes:
        raise PayloadError("oversized", f"{len(payload)} bytes, the limit is {limits.max_payload_bytes}")
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as e:
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            raise PayloadError("bad_encoding", "payload is not UTF-8") from None
        raise PayloadError("bad_json", str(e)) from None
    if not isinstance(doc, dict):
        raise PayloadError("not_object", f"payload is a JSON {type(doc).__name__}, not an object")
    return doc


def parse_ts(value: Any, now_ms: int, limits: Limits) -> int:
    """Contract timestamp -> ms since the epoch; missing means now."""
    if value is None:
        return now_ms
    if isinstance(value, bool):
        raise PayloadError("bad_timestamp", "ts must be an RFC 3339 string or integer milliseconds")
    if isinstance(value, int):
        ts = value
    elif isinstance(value, str):
        try:
            ts = rfc3339_ms(value)
        except ValueError as e:
            raise PayloadError("bad_timestamp", f"ts {e}") from None
    else:
        raise PayloadError("bad_timestamp", "ts must be an RFC 3339 string or integer milliseconds")
    if ts > now_ms + limits.max_future_ms:
        raise PayloadError("clock_skew", f"ts is {(ts - now_ms) / 1000:.0f} s in the future")
    if ts < now_ms - limits.max_age_ms:
        raise PayloadError("too_old", f"ts is {(now_ms - ts) / 86_400_000:.1f} days old")
    return ts


def validate(kind: str, vehicle_id: str, doc: dict[str, Any], now_ms: int, limits: Limits) -> Reading:
    """Check a decoded telemetry object against the contract for `kind`."""
    spec = SPECS[kind]
    claimed = doc.get("vehicle_id")
    if claimed is not None and claimed != vehicle_id:
        raise PayloadError("vehicle_mismatch", f"payload says {str(claimed)[:40]!r}, topic says {vehicle_id}")
    fields: dict[str, Any] = {}
    for name, required, typ, low, high in spec:
        v = doc.get(name)
        if v is None:
            if required:
                raise PayloadError("missing_field", f"{kind} needs {name}")
            continue
        if typ == "num":
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise PayloadError("bad_type", f"{name} must be a number, got {type(v).__name__}")
            v = float(v)
            if not math.isfinite(v) or (low is not None and v < low) or (high is not None and v > high):
                raise PayloadError("out_of_range", f"{name}={v:g} is outside {_range(low, high)}")
        elif typ == "bool":
            if not isinstance(v, bool):
                raise PayloadError("bad_type", f"{name} must be true or false, got {type(v).__name__}")
        elif not isinstance(v, str):
            raise PayloadError("bad_type", f"{name} must be a string, got {type(v).__name__}")
        else:
            # The contract sets no limit: keep the message (and its `online`), bound the state. U+0000 goes:
            # PostgreSQL refuses it in JSON, and the shared state would stop at that car's batch.
            v = v[:64].replace("\x00", "")
        fields[name] = v
    ts = parse_ts(doc.get("ts"), now_ms, limits)
    return Reading(kind, vehicle_id, ts, fields)


def _range(low: float | None, high: float | None) -> str:
    if high is None:
        return f"[{low:g}, ∞)"
    return f"[{low:g}, {high:g}]"


def check_vehicle_id(vehicle_id: str) -> None:
    if not VEHICLE_ID.matches(vehicle_id):
        raise PayloadError("bad_vehicle_id", f"{vehicle_id[:40]!r} is not a valid vehicle id")
