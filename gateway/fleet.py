"""The vehicle registry (``config/fleet.yaml``): models, stations and cars.

The gateway accepts messages only from cars listed here; the simulator
drives the same file, so both always agree on ids, models and stations.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gateway.errors import ConfigError
from gateway.ids import VEHICLE_ID


@dataclass(frozen=True, slots=True)
class Model:
    id: str
    name: str
    battery_kwh: float
    consumption_kwh_per_100km: float
    ac_charge_kw: float


DEFAULT_RADIUS_M = 150.0


@dataclass(frozen=True, slots=True)
class Station:
    id: str
    town: str
    lat: float
    lon: float
    radius_m: float = DEFAULT_RADIUS_M  # a car is at its station within this distance


@dataclass(frozen=True, slots=True)
class ServiceArea:
    lat_min: float
    lat_max: float
    lon_min: float
    lon_max: float

    def contains(self, lat: float, lon: float) -> bool:
        return self.lat_min <= lat <= self.lat_max and self.lon_min <= lon <= self.lon_max


@dataclass(frozen=True, slots=True)
class Vehicle:
    id: str
    model: str
    station: str


@dataclass(frozen=True)
class Fleet:
    models: dict[str, Model]
    stations: dict[str, Station]
    vehicles: dict[str, Vehicle]
    service_area: ServiceArea | None = None

    def with_generated(self, total: int) -> Fleet:
        """This fleet grown to `total` cars, the extra ones spread over the stations.

        Generated ids are ``SIM-00030`` and on, so they never collide with real ones.
        """
        vehicles = dict(self.vehicles)
        stations = list(self.stations.values())
        models = sorted(self.models)
        i = len(vehicles)
        while len(vehicles) < total:
            i += 1
            vid = f"SIM-{i:05d}"
            vehicles[vid] = Vehicle(vid, models[i % len(models)], stations[i % len(stations)].id)
        return Fleet(self.models, self.stations, vehicles, self.service_area)

    def to_yaml(self) -> str:
        doc = {
            "models": {
                m.id: {
                    "name": m.name,
                    "battery_kwh": m.battery_kwh,
                    "consumption_kwh_per_100km": m.consumption_kwh_per_100km,
                    "ac_charge_kw": m.ac_charge_kw,
                }
                for m in self.models.values()
            },
            "stations": [
                {"id": s.id, "town": s.town, "lat": s.lat, "lon": s.lon}
                | ({"radius_m": s.radius_m} if s.radius_m != DEFAULT_RADIUS_M else {})
                for s in self.stations.values()
            ],
            "vehicles": [{"id": v.id, "model": v.model, "station": v.station} for v in self.vehicles.values()],
        }
        if self.service_area is not None:
            doc["service_area"] = dataclasses.asdict(self.service_area)
        return yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)


def _req(d: dict[str, Any], key: str, where: str, typ: type | tuple[type, ...]) -> Any:
    if key not in d:
        raise ConfigError(f"{where}.{key}: missing")
    v = d[key]
    if not isinstance(v, typ) or isinstance(v, bool):
        raise ConfigError(f"{where}.{key}: wrong type ({type(v).__name__})")
    return v


def parse_fleet(doc: Any, source: str = "fleet") -> Fleet:
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with models, stations and vehicles")
    for key, typ, shape in (("models", dict, "a mapping of model id to model"), ("stations", list, "a list"),
                            ("vehicles", list, "a list")):  # fmt: skip
        if not isinstance(doc.get(key) or typ(), typ):
            raise ConfigError(f"{source}: {key}: must be {shape}")
    models: dict[str, Model] = {}
    for mid, m in (doc.get("models") or {}).items():
        w = f"{source}: models.{mid}"
        if not isinstance(m, dict):
            raise ConfigError(f"{w}: must be a mapping")
        num = (int, float)
        models[str(mid)] = Model(
            str(mid),
            str(m.get("name", mid)),
            float(_req(m, "battery_kwh", w, num)),
            float(_req(m, "consumption_kwh_per_100km", w, num)),
            float(_req(m, "ac_charge_kw", w, num)),
        )
    stations: dict[str, Station] = {}
    for i, s in enumerate(doc.get("stations") or []):
        w = f"{source}: stations[{i}]"
        if not isinstance(s, dict):
            raise ConfigError(f"{w}: must be a mapping")
        sid = str(_req(s, "id", w, str))
        radius = float(_req(s, "radius_m", w, (int, float))) if "radius_m" in s else DEFAULT_RADIUS_M
        if not radius > 0:
            raise ConfigError(f"{w}.radius_m: must be more than 0")
        stations[sid] = Station(
            sid,
            str(s.get("town", sid)),
            float(_req(s, "lat", w, (int, float))),
            float(_req(s, "lon", w, (int, float))),
            radius,
        )
    vehicles: dict[str, Vehicle] = {}
    for i, v in enumerate(doc.get("vehicles") or []):
        w = f"{source}: vehicles[{i}]"
        if not isinstance(v, dict):
            raise ConfigError(f"{w}: must be a mapping")
        vid = _req(v, "id", w, str)
        if not VEHICLE_ID.matches(vid):
            raise ConfigError(f"{w}.id: {vid!r} is not a valid vehicle id ({VEHICLE_ID.describe})")
        if vid in vehicles:
            raise ConfigError(f"{w}.id: {vid} is listed twice")
        model = _req(v, "model", w, str)
        if model not in models:
            raise ConfigError(f"{w}.model: {model!r} is not one of the models ({', '.join(models)})")
        station = _req(v, "station", w, str)
        if station not in stations:
            raise ConfigError(f"{w}.station: {station!r} is not one of the stations")
        vehicles[vid] = Vehicle(vid, model, station)
    if not vehicles:
        raise ConfigError(f"{source}: vehicles: the fleet has no vehicle")
    return Fleet(models, stations, vehicles, _service_area(doc.get("service_area"), source))


def _service_area(doc: Any, source: str) -> ServiceArea | None:
    if doc is None:
        return None
    w = f"{source}: service_area"
    if not isinstance(doc, dict):
        raise ConfigError(f"{w}: must be a mapping with lat_min, lat_max, lon_min, lon_max")
    num = (int, float)
    a = ServiceArea(*(float(_req(doc, k, w, num)) for k in ("lat_min", "lat_max", "lon_min", "lon_max")))
    if not (-90 <= a.lat_min < a.lat_max <= 90 and -180 <= a.lon_min < a.lon_max <= 180):
        raise ConfigError(f"{w}: needs lat_min < lat_max within ±90 and lon_min < lon_max within ±180")
    return a


def load_fleet(path: Path) -> Fleet:
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"fleet.file: {path} not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"fleet.file: {path} is not valid YAML ({e})") from None
    return parse_fleet(doc, str(path))
