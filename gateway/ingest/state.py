"""The latest known state of every car, as served by ``GET /v1/vehicles``.

A reading replaces the stored one of its kind only if it is not older, so a
car replaying what it buffered offline never moves its state backwards.
The state is saved to the state directory every few seconds and at
shutdown, so a restarted gateway still knows where every car is (a parked
car may not report its position for five minutes).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from gateway.errors import StartupError
from gateway.fleet import Fleet
from gateway.ingest.telemetry import KINDS, Reading
from gateway.times import iso_ms

log = logging.getLogger(__name__)


@dataclass(slots=True)
class VehicleState:
    readings: dict[str, Reading] = field(default_factory=dict)
    last_seen_ms: int | None = None


class FleetState:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.vehicles = {vid: VehicleState() for vid in fleet.vehicles}
        # Cars changed here since the last share with the other gateways (state_sync.py); a set, so a car
        # reporting 100 times between two shares is shared once.
        self.dirty: set[str] = set()

    def update(self, r: Reading, received_ms: int | None) -> bool:
        """Keep `r` unless a newer reading of its kind is known (then False); `received_ms` None: not
        heard from now."""
        st = self.vehicles[r.vehicle_id]
        old = st.readings.get(r.kind)
        kept = old is None or r.ts_ms >= old.ts_ms
        if kept:
            st.readings[r.kind] = r
        if received_ms is not None:
            st.last_seen_ms = received_ms
        if kept or received_ms is not None:
            self.dirty.add(r.vehicle_id)
        return kept

    def merge(self, r: Reading) -> None:
        """A reading another gateway had: newest wins, as for our own, and it is not ours to share again.
        (Its last-seen time comes apart, with the cars whose time alone changed: state_sync.py.)"""
        st = self.vehicles.get(r.vehicle_id)
        if st is None:
            return  # a car another gateway's registry has and ours does not
        old = st.readings.get(r.kind)
        if old is None or r.ts_ms > old.ts_ms:
            st.readings[r.kind] = r

    def save(self, path: Path) -> None:
        doc = {
            vid: {
                "last_seen_ms": st.last_seen_ms,
                "readings": {k: {"ts_ms": r.ts_ms, "fields": r.fields} for k, r in st.readings.items()},
            }
            for vid, st in self.vehicles.items()
            if st.last_seen_ms is not None
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(doc))
        os.replace(tmp, path)

    def load(self, path: Path) -> None:
        """Restore a saved state; cars no longer in the registry, and a damaged file, are skipped."""
        try:
            doc = orjson.loads(path.read_bytes())
            for vid, saved in doc.items():
                st = self.vehicles.get(vid)
                if st is None:
                    continue
                st.last_seen_ms = int(saved["last_seen_ms"])
                for kind, r in saved["readings"].items():
                    if kind in KINDS:
                        st.readings[kind] = Reading(kind, vid, int(r["ts_ms"]), dict(r["fields"]))
        except FileNotFoundError:
            return
        except OSError as e:
            raise StartupError(f"state.dir: cannot read the saved vehicle state {path}: {e.strerror or e}") from e
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            log.warning("ignoring the saved vehicle state %s (%s); it rebuilds as cars report", path, e)

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
