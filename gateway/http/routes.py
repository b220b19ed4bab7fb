"""Every HTTP route of the gateway, in one place.

Handlers parse the request with the models of ``schemas.py``, call one
service, and render what it returns; errors go up to the middleware.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, ValidationError

from gateway.errors import InvalidBody, InvalidInput, InvalidQuery, InvalidReservation, RateLimited, UnknownVehicle
from gateway.http.keys import BOOKING, FEED, FLEET, LIMITER, MONITOR, RENTALS, STATE
from gateway.http.middleware import CALLER, read_json
from gateway.http.openapi import openapi_document
from gateway.http.problems import json_response, outcome_response, validation_problem
from gateway.http.schemas import (
    AlertList,
    AlertOut,
    CommandIn,
    CommandList,
    CommandOut,
    DisplacedOut,
    EndIn,
    ReservationIn,
    ReservationList,
    ReservationOut,
    ReservationPut,
    TripList,
    TripOut,
)
from gateway.metrics import CONTENT_TYPE, health
from gateway.rules.commands import Action, Outcome
from gateway.rules.events import alert_doc
from gateway.rules.reservations import EARLIEST_MS, LATEST_MS, check_id
from gateway.rules.usage import users_csv
from gateway.times import rfc3339_ms

MAX_LIMIT = 5000
M = TypeVar("M", bound=BaseModel)


def _parse(model: type[M], doc: object, error: type[InvalidInput]) -> M:
    try:
        return model.model_validate(doc)
    except ValidationError as e:
        raise validation_problem(e, error) from None


def _only(q: Mapping[str, str], allowed: set[str]) -> None:
    unknown = set(q) - allowed
    if unknown:
        raise InvalidQuery("query", f"unknown parameter(s): {', '.join(sorted(unknown))}")


def _query(
    q: Mapping[str, str], allowed: set[str], time_error: type[InvalidInput]
) -> tuple[int | None, int | None, int]:
    """``from``, ``to`` (ms) and ``limit`` of a listing; anything else asked for is a 400."""
    _only(q, allowed)

    def when(name: str) -> int | None:
        if name not in q:
            return None
        try:
            ms = rfc3339_ms(q[name])
        except ValueError as e:
            raise time_error(name, f"{e}, e.g. 2026-11-26T09:00:00Z") from None
        if not EARLIEST_MS <= ms < LATEST_MS:
            raise time_error(name, "must be between the years 2000 and 2199")
        return ms

    limit_s = q.get("limit", "500")
    if not (limit_s.isascii() and limit_s.isdigit() and len(limit_s) <= 4) or not 1 <= int(limit_s) <= MAX_LIMIT:
        raise InvalidQuery("limit", f"a whole number from 1 to {MAX_LIMIT}")
    return when("from"), when("to"), int(limit_s)


async def list_vehicles(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return json_response({"vehicles": [state.view(vid) for vid in request.app[FLEET].vehicles]})


async def get_vehicle(request: web.Request) -> web.Response:
    vid = request.match_info["vehicle_id"]
    if vid not in request.app[FLEET].vehicles:
        raise UnknownVehicle(vid)
    return json_response(request.app[STATE].view(vid))


async def put_reservation(request: web.Request) -> web.Response:
    rid = request.match_info["reservation_id"]
    check_id(rid)
    body = _parse(ReservationIn, await read_json(request), InvalidReservation)
    stored, created, moves = await request.app[BOOKING].put(rid, body.request(), request[CALLER])
    displaced = [DisplacedOut(reservation_id=m.reservation_id, action=m.action, vehicle_id=m.vehicle_id) for m in moves]
    answer = ReservationPut(**ReservationOut.of(stored).model_dump(), displaced=displaced)
    return json_response(answer.model_dump(), 201 if created else 200)


async def get_reservation(request: web.Request) -> web.Response:
    r = await request.app[BOOKING].get(request.match_info["reservation_id"])
    return json_response(ReservationOut.of(r).model_dump())


async def list_reservations(request: web.Request) -> web.Response:
    q = request.query
    start, end, limit = _query(q, {"vehicle_id", "from", "to", "limit"}, InvalidReservation)
    found = await request.app[BOOKING].find(q.get("vehicle_id"), start, end, limit)
    return json_response(ReservationList(reservations=[ReservationOut.of(r) for r in found]).model_dump())


async def delete_reservation(request: web.Request) -> web.Response:
    await request.app[BOOKING].cancel(request.match_info["reservation_id"])
    return web.Response(status=204)


async def _command(request: web.Request, action: Action) -> web.Response:
    limiter = request.app[LIMITER]
    caller = request[CALLER]
    wait = limiter.take(caller, time.monotonic())
    if wait:
        raise RateLimited(
            f"more than {limiter.per_min} unlock/lock calls a minute with this API key; retry later", wait
        )
    body = _parse(CommandIn, await read_json(request), InvalidBody)
    outcome = await request.app[BOOKING].command(
        request.match_info["vehicle_id"], action, body.reservation_id, caller, request.headers.get("Idempotency-Key")
    )
    return outcome_response(outcome)


async def unlock(request: web.Request) -> web.Response:
    return await _command(request, "unlock")


async def lock(request: web.Request) -> web.Response:
    return await _command(request, "lock")


async def vehicle_commands(request: web.Request) -> web.Response:
    start, end, limit = _query(request.query, {"from", "to", "limit"}, InvalidQuery)
    found = await request.app[BOOKING].commands_of(request.match_info["vehicle_id"], start, end, limit)
    return json_response(CommandList(commands=[CommandOut.of(c) for c in found]).model_dump())


async def end_rental(request: web.Request) -> web.Response:
    body = _parse(EndIn, await read_json(request, optional=True), InvalidBody)
    ended = await request.app[RENTALS].end(request.match_info["reservation_id"], body.force, request[CALLER])
    if isinstance(ended, Outcome):
        return outcome_response(ended)  # the car did not lock: 502 or 504, as for .../lock
    return json_response(TripOut.of(ended).model_dump())


async def get_trip(request: web.Request) -> web.Response:
    trip = await request.app[RENTALS].trip(request.match_info["reservation_id"])
    return json_response(TripOut.of(trip).model_dump())


async def list_trips(request: web.Request) -> web.Response:
    q = request.query
    start, end, limit = _query(q, {"from", "to", "vehicle_id", "user_id", "limit"}, InvalidQuery)
    found = await request.app[RENTALS].trips(start, end, q.get("vehicle_id"), q.get("user_id"), limit)
    return json_response(TripList(trips=[TripOut.of(t) for t in found]).model_dump())


async def usage_report(request: web.Request) -> web.Response:
    q = request.query
    _only(q, {"month", "format"})
    fmt = q.get("format", "json")
    if fmt not in ("json", "csv"):
        raise InvalidQuery("format", "json or csv")
    report = await request.app[RENTALS].usage(q.get("month", ""))
    if fmt == "csv":
        name = f"usage-{report['month']}.csv"
        return web.Response(
            text=users_csv(report),
            content_type="text/csv",
            charset="utf-8",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )
    # Built by rules/usage.py in the shape of UsageReport (a unit test checks it): no second pass here.
    return json_response(report)


async def availability(request: web.Request) -> web.Response:
    q = request.query
    start, end, _ = _query(q, {"station", "model", "from", "to"}, InvalidQuery)
    free = await request.app[BOOKING].available(q.get("station"), q.get("model"), start, end)
    state, fleet = request.app[STATE], request.app[FLEET]
    out = []
    for vid in free:
        v = fleet.vehicles[vid]
        bat = state.vehicles[vid].readings.get("battery")
        f = bat.fields if bat else {}
        out.append({"vehicle_id": vid, "model": v.model, "station": v.station, "soc_pct": f.get("soc_pct"),
                    "range_km": f.get("range_km")})  # fmt: skip
    return json_response({"vehicles": out})


async def list_events(request: web.Request) -> web.Response:
    q = request.query
    _, _, limit = _query(q, {"after", "type", "limit"}, InvalidQuery)
    after = q.get("after")
    found = await request.app[FEED].events(after, q.get("type"), limit)
    # The bodies are stored as the exact JSON webhooks send: spliced in, not parsed and rebuilt.
    nxt = found[-1].id if found else after
    body = b'{"events":[' + b",".join(e.body for e in found) + b'],"next":' + orjson.dumps(nxt) + b"}"
    return web.Response(body=body, content_type="application/json")


async def list_alerts(request: web.Request) -> web.Response:
    q = request.query
    _, _, limit = _query(q, {"status", "vehicle_id", "type", "limit"}, InvalidQuery)
    found = await request.app[FEED].alerts(q.get("status", "open"), q.get("vehicle_id"), q.get("type"), limit)
    return json_response(AlertList(alerts=[AlertOut.model_validate(alert_doc(a)) for a in found]).model_dump())


async def healthz(request: web.Request) -> web.Response:
    ok, body = health(request.app[MONITOR].snapshot())
    return json_response(body, 200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[MONITOR].render(), headers={"Content-Type": CONTENT_TYPE})


async def openapi(request: web.Request) -> web.Response:
    return json_response(openapi_document())


def setup_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/healthz", healthz)
    r.add_get("/metrics", metrics)
    r.add_get("/openapi.json", openapi)
    r.add_get("/v1/vehicles", list_vehicles)
    r.add_get("/v1/vehicles/{vehicle_id}", get_vehicle)
    r.add_post("/v1/vehicles/{vehicle_id}/unlock", unlock)
    r.add_post("/v1/vehicles/{vehicle_id}/lock", lock)
    r.add_get("/v1/vehicles/{vehicle_id}/commands", vehicle_commands)
    r.add_get("/v1/reservations", list_reservations)
    r.add_put("/v1/reservations/{reservation_id}", put_reservation)
    r.add_get("/v1/reservations/{reservation_id}", get_reservation)
    r.add_delete("/v1/reservations/{reservation_id}", delete_reservation)
    r.add_post("/v1/reservations/{reservation_id}/end", end_rental)
    r.add_get("/v1/reservations/{reservation_id}/trip", get_trip)
    r.add_get("/v1/trips", list_trips)
    r.add_get("/v1/reports/usage", usage_report)
    r.add_get("/v1/availability", availability)
    r.add_get("/v1/events", list_events)
    r.add_get("/v1/alerts", list_alerts)
