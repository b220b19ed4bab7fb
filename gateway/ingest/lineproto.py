"""InfluxDB line protocol for the contract's measurements. Pure functions.

We write line protocol by hand rather than through ``influxdb_client.Point``:
it is the hot path (about 16 µs a point with Point, under 2 µs here), and
the schema is small and fixed.
"""

from __future__ import annotations

from typing import Any

from gateway.ingest.telemetry import STORED, Reading

_TAG_ESCAPE = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ ", "\n": "", "\r": ""})


def tag(value: str) -> str:
    return value.translate(_TAG_ESCAPE)


def field_value(v: Any) -> str:
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, int):
        return f"{v}i"
    s = str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{s}"'


def fields(values: dict[str, Any]) -> str:
    return ",".join(f"{tag(k)}={field_value(v)}" for k, v in values.items())


def line(measurement: str, tags: dict[str, str], values: dict[str, Any], ts_ms: int) -> bytes:
    """One point; tags in the order given (InfluxDB sorts them itself)."""
    head = measurement + "".join(f",{tag(k)}={tag(v)}" for k, v in tags.items() if v != "")
    return f"{head} {fields(values)} {ts_ms}\n".encode()


def reading_line(r: Reading, model: str) -> bytes | None:
    """The point for a valid car message, or None if nothing in it is stored."""
    stored = STORED[r.kind]
    values = {k: v for k, v in r.fields.items() if k in stored}
    if not values:
        return None
    return f"{r.kind},model={tag(model)},vehicle_id={r.vehicle_id} {fields(values)} {r.ts_ms}\n".encode()


def excerpt(payload: bytes | bytearray, limit: int = 200) -> str:
    return payload[:limit].decode("utf-8", errors="replace")[:limit]


class DistinctTimes:
    """Millisecond timestamps that never repeat for the same key.

    Points with equal measurement, tags and time overwrite each other in
    InfluxDB. For events that must each count (rejections, commands) the
    timestamp is moved on by a millisecond when it would collide.
    """

    def __init__(self) -> None:
        self._last: dict[object, int] = {}

    def next(self, key: object, ms: int) -> int:
        ts = max(ms, self._last.get(key, 0) + 1)
        self._last[key] = ts
        return ts
