"""The OpenAPI 3.1 description of the HTTP API, served at ``/openapi.json``.

Paths and descriptions are written here by hand; every schema is generated
from the pydantic models of ``schemas.py``, which also validate requests
and build answers, so the document cannot drift from what the gateway does
(``tests/test_openapi.py`` checks real answers against it, and schemathesis
fuzzes the gateway from it).
"""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from gateway.http.schemas import (
    AlertList,
    Availability,
    CommandDone,
    CommandIn,
    CommandList,
    EndIn,
    Error,
    EventList,
    ReservationIn,
    ReservationList,
    ReservationOut,
    ReservationPut,
    TripList,
    TripOut,
    UsageReport,
    Vehicle,
    VehicleList,
)
from gateway.ids import EVENT_ID, IDEMPOTENCY_KEY, RESERVATION_ID, VEHICLE_ID
from gateway.rules.alerts import ALERT_TYPES
from gateway.rules.events import EVENT_TYPES

_MODELS: list[tuple[type[BaseModel], JsonSchemaMode]] = [
    (ReservationIn, "validation"),
    (CommandIn, "validation"),
    (Error, "serialization"),
    (ReservationOut, "serialization"),
    (ReservationPut, "serialization"),
    (Availability, "serialization"),
    (ReservationList, "serialization"),
    (CommandDone, "serialization"),
    (CommandList, "serialization"),
    (Vehicle, "serialization"),
    (EndIn, "validation"),
    (TripOut, "serialization"),
    (TripList, "serialization"),
    (UsageReport, "serialization"),
    (VehicleList, "serialization"),
    (EventList, "serialization"),
    (AlertList, "serialization"),
]


def schemas() -> dict[str, Any]:
    _, top = models_json_schema(_MODELS, ref_template="#/components/schemas/{model}")
    return dict(top["$defs"])


def ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _err(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": ref(Error)}}}


def _ok(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


TIME_PARAM = {"type": "string", "format": "date-time"}
LIMIT_PARAM = {"type": "integer", "minimum": 1, "maximum": 5000}


@cache
def openapi_document() -> dict[str, Any]:
    vid = {
        "name": "vehicle_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": VEHICLE_ID.anchored},
    }
    rid = {
        "name": "reservation_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": RESERVATION_ID.anchored},
    }
    idem = {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "schema": {"type": "string", "pattern": IDEMPOTENCY_KEY.anchored},
        "description": "a retry with the same key gets the first answer and sends no second command",
    }

    def query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
        return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}

    unauthorized = _err("missing or invalid API key")
    store_down = _err("store_unavailable: the store could not be read or written")
    bad_body = _err("malformed body (bad JSON or empty)")
    too_large = _err("body_too_large")
    health = {"type": "object", "required": ["status"]}
    paths: dict[str, Any] = {
        "/healthz": {
            "get": {
                "summary": "Liveness and what is degraded",
                "security": [],
                "responses": {
                    "200": _ok("healthy", health),
                    "503": _ok("degraded (broker, InfluxDB, buffer or a stopped task)", health),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (text format 0.0.4)",
                "security": [],
                "responses": {
                    "200": {
                        "description": "Prometheus text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "security": [],
                "responses": {"200": _ok("OpenAPI 3.1", {"type": "object"})},
            }
        },
        "/v1/vehicles": {
            "get": {
                "summary": "Every car with its latest state",
                "responses": {"200": _ok("the fleet", ref(VehicleList)), "401": unauthorized},
            }
        },
        "/v1/vehicles/{vehicle_id}": {
            "get": {
                "summary": "One car with its latest state",
                "parameters": [vid],
                "responses": {
                    "200": _ok("the car", ref(Vehicle)),
                    "401": unauthorized,
                    "404": _err("unknown_vehicle"),
                },
            }
        },
        "/v1/vehicles/{vehicle_id}/commands": {
            "get": {
                "summary": "The command audit of one car: who asked for what, and how it ended; newest first",
                "parameters": [
                    vid,
                    query("from", TIME_PARAM, "issued at or after"),
                    query("to", TIME_PARAM, "issued before"),
                    query("limit", LIMIT_PARAM, "at most this many (default 500)"),
                ],
                "responses": {
                    "200": _ok("the commands", ref(CommandList)),
                    "400": _err("bad_query: unknown parameter, bad time or limit"),
                    "401": unauthorized,
                    "404": _err("unknown_vehicle"),
                    "503": store_down,
                },
            }
        },
    }
    for action in ("unlock", "lock"):
        paths[f"/v1/vehicles/{{vehicle_id}}/{action}"] = {
            "post": {
                "summary": f"Send a signed {action} command and wait for the car's acknowledgement",
                "parameters": [vid, idem],
                "requestBody": {"required": True, "content": {"application/json": {"schema": ref(CommandIn)}}},
                "responses": {
                    "200": _ok("the car did it", ref(CommandDone)),
                    "400": _err("bad_json, or bad_idempotency_key"),
                    "401": unauthorized,
                    "404": _err("unknown_vehicle or unknown_reservation"),
                    "409": _err("reservation_not_active"),
                    "413": too_large,
                    "422": _err("invalid_body or idempotency_key_reused"),
                    "429": _err("rate_limited (see Retry-After)"),
                    "502": _err("command_rejected or command_failed, with the car's reason"),
                    "503": _err("broker_unavailable, or store_unavailable"),
                    "504": _err("vehicle_timeout: no ack in time; the command has expired on the car"),
                },
            }
        }
    paths["/v1/reservations"] = {
        "get": {
            "summary": "Reservations, optionally of one vehicle and overlapping [from, to)",
            "parameters": [
                query("vehicle_id", {"type": "string", "pattern": VEHICLE_ID.anchored}, "only this car's"),
                query("from", TIME_PARAM, "ending after"),
                query("to", TIME_PARAM, "starting before"),
                query("limit", LIMIT_PARAM, "at most this many (default 500)"),
            ],
            "responses": {
                "200": _ok("reservations by start time", ref(ReservationList)),
                "400": _err("bad_query: unknown parameter or bad limit"),
                "401": unauthorized,
                "404": _err("unknown_vehicle"),
                "422": _err("invalid_reservation: bad time in from/to"),
                "503": store_down,
            },
        }
    }
    paths["/v1/reservations/{reservation_id}"] = {
        "put": {
            "summary": "Create or update a reservation",
            "parameters": [rid],
            "requestBody": {"required": True, "content": {"application/json": {"schema": ref(ReservationIn)}}},
            "responses": {
                "200": _ok("updated (a staff reservation: with what it displaced)", ref(ReservationPut)),
                "201": _ok("created (a staff reservation: with what it displaced)", ref(ReservationPut)),
                "400": bad_body,
                "401": unauthorized,
                "409": _err("reservation_conflict (overlaps another live reservation) or reservation_cancelled"),
                "413": too_large,
                "422": _err("invalid_reservation, naming the field"),
                "503": store_down,
            },
        },
        "get": {
            "summary": "One reservation, with the outcome of its start-time unlock",
            "parameters": [rid],
            "responses": {
                "200": _ok("the reservation", ref(ReservationOut)),
                "401": unauthorized,
                "404": _err("unknown_reservation"),
                "503": store_down,
            },
        },
        "delete": {
            "summary": "Cancel a reservation; it opens the car no more",
            "parameters": [rid],
            "responses": {
                "204": {"description": "cancelled"},
                "401": unauthorized,
                "404": _err("unknown_reservation"),
                "503": store_down,
            },
        },
    }
    paths["/v1/reservations/{reservation_id}/end"] = {
        "post": {
            "summary": "End the rental: check the car, lock it, close the trip",
            "parameters": [rid],
            "requestBody": {"required": False, "content": {"application/json": {"schema": ref(EndIn)}}},
            "responses": {
                "200": _ok("ended: the trip", ref(TripOut)),
                "400": _err("bad_json"),
                "401": unauthorized,
                "404": _err("unknown_reservation"),
                "409": _err(
                    "end_checks_failed (the error names them in `failed`), or reservation_not_active "
                    "(the trip never started or has ended)"
                ),
                "413": too_large,
                "422": _err("invalid_body"),
                "502": _err("command_rejected or command_failed: the car did not lock"),
                "503": _err("broker_unavailable, or store_unavailable"),
                "504": _err("vehicle_timeout"),
            },
        }
    }
    paths["/v1/reservations/{reservation_id}/trip"] = {
        "get": {
            "summary": "The trip of a reservation (running or ended)",
            "parameters": [rid],
            "responses": {
                "200": _ok("the trip", ref(TripOut)),
                "401": unauthorized,
                "404": _err("unknown_reservation, or no_trip: the car was never unlocked"),
                "503": store_down,
            },
        }
    }
    paths["/v1/trips"] = {
        "get": {
            "summary": "Trips by start time",
            "parameters": [
                query("from", TIME_PARAM, "started at or after"),
                query("to", TIME_PARAM, "started before"),
                query("vehicle_id", {"type": "string", "pattern": VEHICLE_ID.anchored}, "only this car's"),
                query("user_id", {"type": "string"}, "only this user's"),
                query("limit", LIMIT_PARAM, "at most this many (default 500)"),
            ],
            "responses": {
                "200": _ok("the trips", ref(TripList)),
                "400": _err("bad_query"),
                "401": unauthorized,
                "404": _err("unknown_vehicle"),
                "503": store_down,
            },
        }
    }
    paths["/v1/availability"] = {
        "get": {
            "summary": "The cars with no live reservation over a span, with their latest charge",
            "parameters": [
                query("station", {"type": "string"}, "only this station's cars"),
                query("model", {"type": "string"}, "only this model"),
                query("from", TIME_PARAM, "start of the span (default now)"),
                query("to", TIME_PARAM, "end of the span, exclusive (default an hour after from)"),
            ],
            "responses": {
                "200": _ok("the free cars", ref(Availability)),
                "400": _err("bad_query"),
                "401": unauthorized,
                "503": store_down,
            },
        }
    }
    paths["/v1/events"] = {
        "get": {
            "summary": "What happened, oldest first (kept events.retention_days); the same events webhooks carry",
            "parameters": [
                query("after", {"type": "string", "pattern": EVENT_ID.anchored}, "only events recorded after this one"),
                query("type", {"enum": list(EVENT_TYPES)}, "only events of this type"),
                query("limit", LIMIT_PARAM, "at most this many (default 500)"),
            ],
            "responses": {
                "200": _ok("the events, and the id to ask after next", ref(EventList)),
                "400": _err("bad_query"),
                "401": unauthorized,
                "503": store_down,
            },
        }
    }
    paths["/v1/alerts"] = {
        "get": {
            "summary": "Alerts, newest first",
            "parameters": [
                query("status", {"enum": ["open", "resolved", "all"]}, "default open"),
                query("vehicle_id", {"type": "string", "pattern": VEHICLE_ID.anchored}, "only this car's"),
                query("type", {"enum": list(ALERT_TYPES)}, "only alerts of this type"),
                query("limit", LIMIT_PARAM, "at most this many (default 500)"),
            ],
            "responses": {
                "200": _ok("the alerts", ref(AlertList)),
                "400": _err("bad_query"),
                "401": unauthorized,
                "404": _err("unknown_vehicle"),
                "503": store_down,
            },
        }
    }
    paths["/v1/reports/usage"] = {
        "get": {
            "summary": "The monthly usage statement (month in the billing time zone)",
            "parameters": [
                {
                    "name": "month",
                    "in": "query",
                    "required": True,
                    "schema": {"type": "string"},
                    "description": "YYYY-MM",
                },
                query("format", {"enum": ["json", "csv"]}, "csv: the users table as text/csv"),
            ],
            "responses": {
                "200": {
                    "description": "the statement",
                    "content": {
                        "application/json": {"schema": ref(UsageReport)},
                        "text/csv": {"schema": {"type": "string"}},
                    },
                },
                "400": _err("bad_query: unknown parameter or format"),
                "401": unauthorized,
                "422": _err("invalid_month"),
                "503": store_down,
            },
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Fleet gateway API",
            "version": "1.1.0",
            "description": "The booking system's API: see docs/booking-api.md.",
        },
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas(),
        },
        "security": [{"bearer": []}],
    }
