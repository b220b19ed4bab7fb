"""Unit tests for gateway.fleet: registry parsing, validation, growth and YAML round trip."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.errors import ConfigError
from gateway.fleet import Fleet, load_fleet, parse_fleet
from gateway.ids import VEHICLE_ID

REPO = Path(__file__).resolve().parent.parent
FLEET_YAML = REPO / "config" / "fleet.yaml"

MINIMAL: dict[str, Any] = {
    "models": {"zoe": {"name": "Renault Zoé", "battery_kwh": 52, "consumption_kwh_per_100km": 17, "ac_charge_kw": 22}},
    "stations": [{"id": "alencon", "town": "Alençon", "lat": 48.43, "lon": 0.09}],
    "vehicles": [{"id": "ZOE-001", "model": "zoe", "station": "alencon"}],
}


def doc(**changes: Any) -> dict[str, Any]:
    d = copy.deepcopy(MINIMAL)
    d.update(changes)
    return d


def error(d: Any) -> str:
    with pytest.raises(ConfigError) as ei:
        parse_fleet(d, "f.yaml")
    return str(ei.value)


@pytest.fixture(scope="module")
def fleet() -> Fleet:
    return load_fleet(FLEET_YAML)


def test_shipped_fleet_has_29_vehicles(fleet: Fleet) -> None:
    ids = list(fleet.vehicles)
    assert len(ids) == 29
    assert len([i for i in ids if i.startswith("ZOE-")]) == 23
    assert len([i for i in ids if i.startswith("KANGOO-")]) == 6
    assert all(VEHICLE_ID.matches(i) for i in ids)
    assert set(fleet.models) == {"zoe", "kangoo"}
    assert {v.model for v in fleet.vehicles.values() if v.id.startswith("ZOE-")} == {"zoe"}
    assert {v.model for v in fleet.vehicles.values() if v.id.startswith("KANGOO-")} == {"kangoo"}
    assert all(v.station in fleet.stations for v in fleet.vehicles.values())


def test_shipped_fleet_details(fleet: Fleet) -> None:
    zoe = fleet.models["zoe"]
    assert zoe.name == "Renault Zoé" and zoe.battery_kwh == 52.0 and type(zoe.battery_kwh) is float
    assert fleet.models["kangoo"].ac_charge_kw == 7.4
    assert fleet.stations["alencon-cd61"].town == "Alençon"
    assert fleet.vehicles["ZOE-001"].station == "alencon-cd61"
    assert fleet.vehicles["KANGOO-006"].station == "laigle"


def test_minimal_fleet_parses() -> None:
    f = parse_fleet(doc())
    assert list(f.vehicles) == ["ZOE-001"]
    assert f.stations["alencon"].lat == 48.43


def test_model_name_defaults_to_id_and_town_to_station_id() -> None:
    d = doc()
    del d["models"]["zoe"]["name"]
    del d["stations"][0]["town"]
    f = parse_fleet(d)
    assert f.models["zoe"].name == "zoe"
    assert f.stations["alencon"].town == "alencon"


@pytest.mark.parametrize("bad_id", ["zoe-001", "Z", "-ZOE", "ZOE_001", "ZOE 001", "A" * 33, ""])
def test_invalid_vehicle_id(bad_id: str) -> None:
    msg = error(doc(vehicles=[{"id": bad_id, "model": "zoe", "station": "alencon"}]))
    assert msg.startswith("f.yaml: vehicles[0].id:")
    assert "not a valid vehicle id" in msg


def test_vehicle_id_with_trailing_newline_is_invalid() -> None:
    assert error(doc(vehicles=[{"id": "ZOE-001\n", "model": "zoe", "station": "alencon"}])).startswith(
        "f.yaml: vehicles[0].id:"
    )


def test_non_string_vehicle_id() -> None:
    assert error(doc(vehicles=[{"id": 17, "model": "zoe", "station": "alencon"}])) == (
        "f.yaml: vehicles[0].id: wrong type (int)"
    )


def test_unknown_model_names_location_and_models() -> None:
    msg = error(doc(vehicles=[{"id": "ZOE-001", "model": "twingo", "station": "alencon"}]))
    assert msg.startswith("f.yaml: vehicles[0].model:")
    assert "'twingo'" in msg and "zoe" in msg


def test_unknown_station() -> None:
    msg = error(doc(vehicles=[{"id": "ZOE-001", "model": "zoe", "station": "caen"}]))
    assert msg.startswith("f.yaml: vehicles[0].station:") and "'caen'" in msg


def test_duplicate_vehicle_names_second_entry() -> None:
    v = {"id": "ZOE-001", "model": "zoe", "station": "alencon"}
    w = {"id": "ZOE-002", "model": "zoe", "station": "alencon"}
    msg = error(doc(vehicles=[v, w, dict(v)]))
    assert msg.startswith("f.yaml: vehicles[2].id:") and "ZOE-001" in msg and "twice" in msg


@pytest.mark.parametrize("vehicles", [[], None])
def test_no_vehicles(vehicles: Any) -> None:
    msg = error(doc(vehicles=vehicles))
    assert msg.startswith("f.yaml:") and "no vehicle" in msg


@pytest.mark.parametrize("missing", ["id", "model", "station"])
def test_vehicle_missing_key(missing: str) -> None:
    v = {"id": "ZOE-001", "model": "zoe", "station": "alencon"}
    del v[missing]
    assert error(doc(vehicles=[v])) == f"f.yaml: vehicles[0].{missing}: missing"


def test_model_missing_and_wrong_number() -> None:
    d = doc()
    del d["models"]["zoe"]["battery_kwh"]
    assert error(d) == "f.yaml: models.zoe.battery_kwh: missing"
    d = doc()
    d["models"]["zoe"]["ac_charge_kw"] = "22"
    assert error(d) == "f.yaml: models.zoe.ac_charge_kw: wrong type (str)"
    d = doc()
    d["models"]["zoe"]["ac_charge_kw"] = True
    assert error(d) == "f.yaml: models.zoe.ac_charge_kw: wrong type (bool)"


def test_station_errors() -> None:
    assert error(doc(stations=[{"id": "alencon", "lon": 0.09}])) == "f.yaml: stations[0].lat: missing"
    assert error(doc(stations=["alencon"])) == "f.yaml: stations[0]: must be a mapping"


def test_entries_must_be_mappings() -> None:
    assert error(doc(vehicles=["ZOE-001"])) == "f.yaml: vehicles[0]: must be a mapping"
    assert error(doc(models={"zoe": None})) == "f.yaml: models.zoe: must be a mapping"


@pytest.mark.parametrize("top", [None, [], "fleet", 3])
def test_top_level_must_be_a_mapping(top: Any) -> None:
    assert error(top).startswith("f.yaml: the top level must be a mapping")


def test_models_as_a_list_is_a_config_error() -> None:
    assert error(doc(models=["zoe"])).startswith("f.yaml: models")


def test_load_fleet_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^fleet\.file: .*absent\.yaml not found"):
        load_fleet(tmp_path / "absent.yaml")


def test_load_fleet_invalid_yaml(tmp_path: Path) -> None:
    p = tmp_path / "fleet.yaml"
    p.write_text("vehicles: [{id: ZOE-001\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^fleet\.file: .*not valid YAML"):
        load_fleet(p)


def test_load_fleet_errors_name_the_file(tmp_path: Path) -> None:
    p = tmp_path / "fleet.yaml"
    p.write_text(yaml.safe_dump(doc(vehicles=[{"id": "bad", "model": "zoe", "station": "alencon"}])), "utf-8")
    with pytest.raises(ConfigError) as ei:
        load_fleet(p)
    assert str(ei.value).startswith(f"{p}: vehicles[0].id:")


# --- with_generated and to_yaml ----------------------------------------------------------------------


def test_with_generated_300(fleet: Fleet) -> None:
    big = fleet.with_generated(300)
    ids = list(big.vehicles)
    assert len(ids) == len(set(ids)) == 300
    assert all(VEHICLE_ID.matches(i) for i in ids)
    assert ids[:29] == list(fleet.vehicles)  # the real cars first, unchanged
    assert big.vehicles["ZOE-001"] == fleet.vehicles["ZOE-001"]
    generated = ids[29:]
    assert generated[0] == "SIM-00030" and generated[-1] == "SIM-00300"
    assert all(v.model in fleet.models and v.station in fleet.stations for v in big.vehicles.values())
    # spread over every model and station
    assert {big.vehicles[i].model for i in generated} == set(fleet.models)
    assert {big.vehicles[i].station for i in generated} == set(fleet.stations)
    # the original is not modified
    assert len(fleet.vehicles) == 29


def test_with_generated_is_deterministic_and_never_shrinks(fleet: Fleet) -> None:
    assert fleet.with_generated(50) == fleet.with_generated(50)
    assert fleet.with_generated(10).vehicles == fleet.vehicles


def test_generated_fleet_passes_validation(fleet: Fleet) -> None:
    big = fleet.with_generated(300)
    assert parse_fleet(yaml.safe_load(big.to_yaml())) == big


def test_to_yaml_round_trip(fleet: Fleet) -> None:
    text = fleet.to_yaml()
    again = parse_fleet(yaml.safe_load(text))
    assert again == fleet
    assert list(again.vehicles) == list(fleet.vehicles)  # order kept
    assert "Alençon" in text  # readable, not escaped


def test_to_yaml_round_trip_through_file(tmp_path: Path, fleet: Fleet) -> None:
    p = tmp_path / "fleet.yaml"
    p.write_text(fleet.with_generated(40).to_yaml(), encoding="utf-8")
    assert load_fleet(p) == fleet.with_generated(40)
