"""Faults on demand: what each one sends, as pure payload builders, plus their names for the CLI.

| fault          | what the car does                                                                 |
|----------------|-----------------------------------------------------------------------------------|
| malformed      | publishes truncated JSON on ``battery``                                           |
| out_of_range   | publishes ``battery`` with ``soc_pct`` 150 and ``temp_c`` 120                     |
| duplicate      | publishes its last ``battery`` message again, byte for byte                       |
| old_ts         | publishes ``battery`` stamped ``old_age_s`` ago (default 2 h: old but accepted)   |
| out_of_order   | publishes ``battery`` now, then one stamped 30 s earlier                          |
| clock_skew     | its clock runs ``skew_s`` ahead from now on (default 10 min: beyond the 5 min)    |
| drop           | drops its TCP connection (the broker sends the will), stays offline ``offline_s``,|
|                | buffering, then reconnects: fresh state first, then the buffer (older ``ts``)     |
| storm          | ``drop`` for all the chosen cars at once, all reconnecting at the same moment     |
"""

from __future__ import annotations

from enum import StrEnum

import orjson


class Fault(StrEnum):
    MALFORMED = "malformed"
    OUT_OF_RANGE = "out_of_range"
    DUPLICATE = "duplicate"
    OLD_TS = "old_ts"
    OUT_OF_ORDER = "out_of_order"
    CLOCK_SKEW = "clock_skew"
    DROP = "drop"
    STORM = "storm"


def malformed_payload(ts: str) -> bytes:
    """Valid UTF-8, invalid JSON: a message cut off mid-way."""
    return b'{"ts": "' + ts.encode() + b'", "soc_pct": 81.5, "range_'


def out_of_range_payload(ts: str) -> bytes:
    return orjson.dumps({"ts": ts, "soc_pct": 150.0, "range_km": 300.0, "charging": False, "temp_c": 120.0})


def restamped(payload: bytes, ts: str) -> bytes:
    """The same JSON message with another ``ts``."""
    doc = orjson.loads(payload)
    doc["ts"] = ts
    return orjson.dumps(doc)
