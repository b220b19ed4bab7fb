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
            "schemas": {"Error": ERROR, "Vehicle": VEHICLE},
        },
        "security": [{"bearer": []}],
    }
