"""The latest known state of every car, as served by ``GET /v1/vehicles``.

A reading replaces the stored one of its kind only if it is not older, so a
car replaying what it buffered offline never moves its state backwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from gateway.fleet import Fleet
from gateway.telemetry import Reading


def iso_ms(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(slots=True)
class VehicleState:
    readings: dict[str, Reading] = field(default_factory=dict)
    last_seen_ms: int | None = None


class FleetState:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.vehicles = {vid: VehicleState() for vid in fleet.vehicles}

    def update(self, r: Reading, received_ms: int) -> None:
        st = self.vehicles[r.vehicle_id]
        st.last_seen_ms = received_ms
        old = st.readings.get(r.kind)
        if old is None or r.ts_ms >= old.ts_ms:
            st.readings[r.kind] = r

    def online_count(self) -> int:
        n = 0
        for st in self.vehicles.values():
            r = st.readings.get("status")
            n += bool(r and r.fields.get("online"))
        return n

    def reporting_count(self) -> int:
        return sum(1 for st in self.vehicles.values() if st.last_seen_ms is not None)

    def view(self, vehicle_id: str) -> dict[str, Any]:
        """The JSON shape of one car: registry data and its latest readings."""
        v = self.fleet.vehicles[vehicle_id]
        st = self.vehicles[vehicle_id]
        station = self.fleet.stations[v.station]
        out: dict[str, Any] = {
            "vehicle_id": v.id,
            "model": v.model,
            "model_name": self.fleet.models[v.model].name,
            "station": {"id": station.id, "town": station.town, "lat": station.lat, "lon": station.lon},
        }
        for kind in ("battery", "location", "doors"):
            r = st.readings.get(kind)
            out[kind] = None if r is None else {**r.fields, "ts": iso_ms(r.ts_ms)}
        status = st.readings.get("status")
        out["online"] = None if status is None else status.fields["online"]
        out["firmware"] = None if status is None else status.fields.get("firmware")
        out["last_seen"] = None if st.last_seen_ms is None else iso_ms(st.last_seen_ms)
        return out
