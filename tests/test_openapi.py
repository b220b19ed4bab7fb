"""/openapi.json describes the API as implemented: real answers are validated against it."""

from __future__ import annotations

import re
from typing import Any

import jsonschema
import pytest

from gateway.http.openapi import openapi_document
from tests.helpers import AUTH
from tests.test_booking_integration import Env, at, body, env  # noqa: F401  (env is a fixture)

SPEC = openapi_document()


def _template(path: str) -> str:
    for template in SPEC["paths"]:
        pattern = "^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$"
        if re.match(pattern, path):
            return str(template)
    raise AssertionError(f"{path} is not in /openapi.json")


def check(method: str, path: str, status: int, payload: Any) -> None:
    op = SPEC["paths"][_template(path)][method.lower()]
    responses = op["responses"]
    assert str(status) in responses, f"{method} {path} answered {status}, which /openapi.json does not list"
    content = responses[str(status)].get("content", {})
    if "application/json" in content:
        # The components travel with the schema so that its "#/components/..." references resolve.
        schema = {**content["application/json"]["schema"], "components": SPEC["components"]}
        jsonschema.validate(payload, schema)


def test_check_catches_a_mismatch() -> None:
    with pytest.raises(jsonschema.ValidationError):
        check("GET", "/v1/vehicles/ZOE-001", 200, {"vehicle_id": "ZOE-001"})
    with pytest.raises(AssertionError):
        check("GET", "/v1/vehicles/ZOE-001", 418, {})


def test_document_is_openapi_3_and_lists_every_route() -> None:
    assert SPEC["openapi"].startswith("3.")
    from gateway.http.routes import setup_routes

    class Router:
        def __init__(self) -> None:
            self.seen: set[tuple[str, str]] = set()

        def __getattr__(self, name: str) -> Any:
            method = name.removeprefix("add_").upper()
            return lambda path, _handler: self.seen.add((method, path))

    class App:
        router = Router()

    setup_routes(App())  # type: ignore[arg-type]
    documented = {(m.upper(), p) for p, ops in SPEC["paths"].items() for m in ops}
    assert App.router.seen == documented


@pytest.mark.integration
async def test_real_answers_match_the_document(env: Env) -> None:  # noqa: F811
    c = env.client
    calls: list[tuple[str, str, dict[str, Any] | None, dict[str, str]]] = [
        ("GET", "/healthz", None, {}),
        ("GET", "/openapi.json", None, {}),
        ("GET", "/v1/vehicles", None, AUTH),
        ("GET", "/v1/vehicles", None, {}),
        ("GET", "/v1/vehicles/ZOE-001", None, AUTH),
        ("GET", "/v1/vehicles/NOPE-1", None, AUTH),
        ("PUT", "/v1/reservations/R-o1", body("ZOE-001"), AUTH),
        ("PUT", "/v1/reservations/R-o1", body("ZOE-001"), AUTH),
        ("PUT", "/v1/reservations/R-o2", body("ZOE-001"), AUTH),
        ("PUT", "/v1/reservations/R-o3", body("ZOE-001", start=5, end=1), AUTH),
        ("PUT", "/v1/reservations/R-o4", body("ZOE-003", unlock_at_start=True), AUTH),
        ("GET", "/v1/reservations/R-o1", None, AUTH),
        ("GET", "/v1/reservations/R-nope", None, AUTH),
        ("GET", "/v1/reservations?vehicle_id=ZOE-001", None, AUTH),
        ("GET", "/v1/reservations?bogus=1", None, AUTH),
        ("POST", "/v1/vehicles/ZOE-001/unlock", {"reservation_id": "R-o1"}, AUTH),
        ("POST", "/v1/vehicles/ZOE-001/lock", {"reservation_id": "R-o1"}, AUTH),
        ("POST", "/v1/vehicles/ZOE-002/unlock", {"reservation_id": "R-o1"}, AUTH),
        ("POST", "/v1/vehicles/ZOE-001/unlock", {"reservation_id": "R-nope"}, AUTH),
        ("POST", "/v1/vehicles/ZOE-001/unlock", {"reservation_id": 7}, AUTH),
        ("POST", "/v1/vehicles/ZOE-003/unlock", {"reservation_id": "R-o4"}, AUTH),
        ("DELETE", "/v1/reservations/R-o1", None, AUTH),
        ("DELETE", "/v1/reservations/R-nope", None, AUTH),
    ]
    statuses = set()
    for method, path, data, headers in calls:
        r = await c.request(method, path, json=data, headers=headers)
        payload = await r.json() if r.content_type == "application/json" else None
        check(method, path.split("?")[0], r.status, payload)
        statuses.add(r.status)
    r = await c.get("/metrics")
    check("GET", "/metrics", r.status, None)
    assert r.content_type == "text/plain"
    assert {200, 201, 204, 401, 404, 409, 422, 400, 504} <= statuses
