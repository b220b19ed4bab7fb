"""The OpenAPI 3 description of the HTTP API, served at ``/openapi.json``.

Kept as data beside the handlers; ``tests/test_openapi.py`` checks real
responses against it, so it cannot drift from what the gateway does.
"""

from __future__ import annotations

from typing import Any

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        }
    },
}

READING = {"type": ["object", "null"], "additionalProperties": True}

VEHICLE = {
    "type": "object",
    "required": ["vehicle_id", "model", "station", "battery", "location", "doors", "online", "last_seen"],
    "properties": {
        "vehicle_id": {"type": "string", "pattern": "^[A-Z0-9][A-Z0-9-]{1,31}$"},
        "model": {"type": "string"},
        "model_name": {"type": "string"},
        "station": {"type": "object"},
        "battery": READING,
        "location": READING,
        "doors": READING,
        "online": {"type": ["boolean", "null"]},
        "firmware": {"type": ["string", "null"]},
        "last_seen": {"type": ["string", "null"], "format": "date-time"},
    },
}


def _err(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _ok(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


RESERVATION_IN = {
    "type": "object",
    "required": ["vehicle_id", "user_id", "starts_at", "ends_at", "kind"],
    "properties": {
        "vehicle_id": {"type": "string"},
        "user_id": {"type": "string", "minLength": 1, "maxLength": 128},
        "starts_at": {"type": "string", "format": "date-time"},
        "ends_at": {"type": "string", "format": "date-time"},
        "kind": {"enum": ["staff", "public"]},
        "unlock_at_start": {"type": "boolean", "default": False},
    },
}

RESERVATION = {
    "type": "object",
    "required": [
        "reservation_id",
        "vehicle_id",
        "user_id",
        "starts_at",
        "ends_at",
        "kind",
        "unlock_at_start",
        "status",
        "created_at",
        "updated_at",
        "start_unlock",
    ],
    "properties": {
        "reservation_id": {"type": "string"},
        "vehicle_id": {"type": "string"},
        "user_id": {"type": "string"},
        "starts_at": {"type": "string", "format": "date-time"},
        "ends_at": {"type": "string", "format": "date-time"},
        "kind": {"enum": ["staff", "public"]},
        "unlock_at_start": {"type": "boolean"},
        "status": {"enum": ["active", "cancelled"]},
        "created_at": {"type": "string", "format": "date-time"},
        "updated_at": {"type": "string", "format": "date-time"},
        "start_unlock": {
            "type": ["object", "null"],
            "required": ["status", "at", "command_id", "reason"],
            "properties": {
                "status": {"enum": ["pending", "done", "rejected", "failed", "timeout"]},
                "at": {"type": "string", "format": "date-time"},
                "command_id": {"type": ["string", "null"]},
                "reason": {"type": ["string", "null"]},
            },
        },
    },
}

COMMAND_IN = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"reservation_id": {"type": ["string", "null"], "pattern": "^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"}},
}

COMMAND_DONE = {
    "type": "object",
    "required": ["command_id", "status", "latency_ms"],
    "properties": {
        "command_id": {"type": "string"},
        "status": {"const": "done"},
        "latency_ms": {"type": "number", "minimum": 0},
        "locked": {"type": "boolean"},
    },
}


def openapi_document() -> dict[str, Any]:
    vid = {"name": "vehicle_id", "in": "path", "required": True, "schema": {"type": "string"}}
    paths: dict[str, Any] = {
        "/healthz": {
            "get": {
                "summary": "Liveness and what is degraded",
                "security": [],
                "responses": {
                    "200": _ok("healthy", {"type": "object", "required": ["status"]}),
                    "503": _ok("degraded (broker, InfluxDB or buffer)", {"type": "object", "required": ["status"]}),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
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
                "responses": {"200": _ok("OpenAPI 3", {"type": "object"})},
            }
        },
        "/v1/vehicles": {
            "get": {
                "summary": "Every car with its latest state",
                "responses": {
                    "200": _ok(
                        "the fleet",
                        {
                            "type": "object",
                            "properties": {
                                "vehicles": {"type": "array", "items": {"$ref": "#/components/schemas/Vehicle"}}
                            },
                        },
                    ),
                    "401": _err("missing or invalid API key"),
                },
            }
        },
        "/v1/vehicles/{vehicle_id}": {
            "get": {
                "summary": "One car with its latest state",
                "parameters": [vid],
                "responses": {
                    "200": _ok("the car", {"$ref": "#/components/schemas/Vehicle"}),
                    "401": _err("missing or invalid API key"),
                    "404": _err("unknown_vehicle"),
                },
            }
        },
    }
    rid = {
        "name": "reservation_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"},
    }
    idem = {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "schema": {"type": "string", "pattern": "^[ -~]{1,200}$"},
        "description": "a retry with the same key gets the first answer and sends no second command",
    }
    json_body = {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ReservationIn"}}},
    }
    unauthorized = _err("missing or invalid API key")
    bad_body = _err("malformed body (bad JSON or too large)")
    for action in ("unlock", "lock"):
        paths[f"/v1/vehicles/{{vehicle_id}}/{action}"] = {
            "post": {
                "summary": f"Send a signed {action} command and wait for the car's acknowledgement",
                "parameters": [vid, idem],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/CommandIn"}}},
                },
                "responses": {
                    "200": _ok("the car did it", {"$ref": "#/components/schemas/CommandDone"}),
                    "400": bad_body,
                    "401": unauthorized,
                    "404": _err("unknown_vehicle or unknown_reservation"),
                    "409": _err("reservation_not_active"),
                    "413": _err("body_too_large"),
                    "422": _err("invalid_body or idempotency_key_reused"),
                    "429": _err("rate_limited (see Retry-After)"),
                    "502": _err("command_rejected or command_failed, with the car's reason"),
                    "503": _err("broker_unavailable"),
                    "504": _err("vehicle_timeout: no ack in time; the command has expired on the car"),
                },
            }
        }
    paths["/v1/reservations"] = {
        "get": {
            "summary": "Reservations, optionally of one vehicle and overlapping [from, to)",
            "parameters": [
                {"name": "vehicle_id", "in": "query", "required": False, "schema": {"type": "string"}},
                {"name": "from", "in": "query", "required": False, "schema": {"type": "string", "format": "date-time"}},
                {"name": "to", "in": "query", "required": False, "schema": {"type": "string", "format": "date-time"}},
                {
                    "name": "limit",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "integer", "minimum": 1, "maximum": 5000},
                },
            ],
            "responses": {
                "200": _ok(
                    "reservations by start time",
                    {
                        "type": "object",
                        "properties": {
                            "reservations": {"type": "array", "items": {"$ref": "#/components/schemas/Reservation"}}
                        },
                    },
                ),
                "400": _err("bad query parameter"),
                "401": unauthorized,
                "404": _err("unknown_vehicle"),
                "422": _err("bad time in from/to"),
            },
        }
    }
    paths["/v1/reservations/{reservation_id}"] = {
        "put": {
            "summary": "Create or update a reservation",
            "parameters": [rid],
            "requestBody": json_body,
            "responses": {
                "200": _ok("updated", {"$ref": "#/components/schemas/Reservation"}),
                "201": _ok("created", {"$ref": "#/components/schemas/Reservation"}),
                "400": bad_body,
                "401": unauthorized,
                "409": _err("reservation_conflict (overlaps another live reservation) or reservation_cancelled"),
                "413": _err("body_too_large"),
                "422": _err("invalid_reservation, naming the field"),
            },
        },
        "get": {
            "summary": "One reservation, with the outcome of its start-time unlock",
            "parameters": [rid],
            "responses": {
                "200": _ok("the reservation", {"$ref": "#/components/schemas/Reservation"}),
                "401": unauthorized,
                "404": _err("unknown_reservation"),
            },
        },
        "delete": {
            "summary": "Cancel a reservation; it opens the car no more",
            "parameters": [rid],
            "responses": {"204": {"description": "cancelled"}, "401": unauthorized, "404": _err("unknown_reservation")},
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Fleet gateway API",
            "version": "1.0.0",
            "description": "The booking system's API: see docs/booking-api.md.",
        },
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": ERROR,
                "Vehicle": VEHICLE,
                "ReservationIn": RESERVATION_IN,
                "Reservation": RESERVATION,
                "CommandIn": COMMAND_IN,
                "CommandDone": COMMAND_DONE,
            },
        },
        "security": [{"bearer": []}],
    }
