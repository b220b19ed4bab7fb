"""One definition of each identifier: settings, registry, provisioning, API and OpenAPI agree."""

from __future__ import annotations

import re

import pytest

from gateway.errors import ConfigError, PayloadError
from gateway.fleet import parse_fleet
from gateway.http.openapi import openapi_document
from gateway.ids import RESERVATION_ID, VEHICLE_ID
from gateway.ingest.telemetry import check_vehicle_id
from gateway.provision import car_credentials

ODD = ["ZOE-001\n", "zoe-001", "-ZOE", "Z", "Z" * 33, "ZOE 001", "ZOE-001\x00"]


@pytest.mark.parametrize("vid", ODD)
def test_every_user_of_the_vehicle_id_refuses_the_same_odd_ids(vid: str) -> None:
    assert not VEHICLE_ID.matches(vid)
    with pytest.raises(ValueError):
        car_credentials("m" * 20, vid)
    with pytest.raises(PayloadError):
        check_vehicle_id(vid)
    doc = {
        "models": {"zoe": {"battery_kwh": 52, "consumption_kwh_per_100km": 17, "ac_charge_kw": 7}},
        "stations": [{"id": "s", "lat": 48.4, "lon": 0.09}],
        "vehicles": [{"id": vid, "model": "zoe", "station": "s"}],
    }
    with pytest.raises(ConfigError):
        parse_fleet(doc)
    schema = openapi_document()["components"]["schemas"]["ReservationIn"]["properties"]["vehicle_id"]
    # JSON Schema's `$` is the end of the text: the same answer as Python's fullmatch.
    assert re.fullmatch(schema["pattern"].strip("^$"), vid) is None


def test_the_api_documents_the_patterns_it_enforces() -> None:
    doc = openapi_document()
    rid = doc["paths"]["/v1/reservations/{reservation_id}"]["put"]["parameters"][0]["schema"]["pattern"]
    assert rid == RESERVATION_ID.anchored
    assert doc["components"]["schemas"]["CommandIn"]["properties"]["reservation_id"]["anyOf"][0]["pattern"] == rid
