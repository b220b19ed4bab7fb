"""Every HTTP route of the gateway, in one place."""

from __future__ import annotations

import time

from aiohttp import web

from gateway.app import RUNTIME
from gateway.booking.dispatcher import Action
from gateway.errors import ApiError
from gateway.http.middleware import API_KEY_ID, json_response, read_json
from gateway.http.openapi import openapi_document
from gateway.metrics import health, prometheus
from gateway.rules.reservations import check_id, parse_time, to_json


async def list_vehicles(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    return json_response({"vehicles": [rt.state.view(vid) for vid in rt.fleet.vehicles]})


async def get_vehicle(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    vid = request.match_info["vehicle_id"]
    if vid not in rt.fleet.vehicles:
        raise ApiError(404, "unknown_vehicle", f"no vehicle {vid[:40]!r} in the fleet registry")
    return json_response(rt.state.view(vid))


async def put_reservation(request: web.Request) -> web.Response:
    body = await read_json(request)
    status, data = request.app[RUNTIME].booking.put(request.match_info["reservation_id"], body)
    return json_response(data, status)


async def get_reservation(request: web.Request) -> web.Response:
    return json_response(to_json(request.app[RUNTIME].booking.get(request.match_info["reservation_id"])))


async def list_reservations(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    q = request.query
    unknown = set(q) - {"vehicle_id", "from", "to", "limit"}
    if unknown:
        raise ApiError(400, "bad_query", f"unknown query parameter(s): {', '.join(sorted(unknown))}")
    vehicle = q.get("vehicle_id")
    if vehicle is not None and vehicle not in rt.fleet.vehicles:
        raise ApiError(404, "unknown_vehicle", f"no vehicle {vehicle[:40]!r} in the fleet registry")
    start = parse_time(q["from"], "from") if "from" in q else None
    end = parse_time(q["to"], "to") if "to" in q else None
    limit_s = q.get("limit", "500")
    if not (limit_s.isascii() and limit_s.isdigit() and len(limit_s) <= 4) or not 1 <= int(limit_s) <= 5000:
        raise ApiError(400, "bad_query", "limit: a whole number from 1 to 5000")
    found = rt.booking.store.query(vehicle, start, end, int(limit_s))
    return json_response({"reservations": [to_json(r) for r in found]})


async def delete_reservation(request: web.Request) -> web.Response:
    request.app[RUNTIME].booking.cancel(request.match_info["reservation_id"])
    return web.Response(status=204)


async def _command(request: web.Request, action: Action) -> web.Response:
    limiter = request.app[RUNTIME].limiter
    wait = limiter.take(request[API_KEY_ID], time.monotonic())
    if wait:
        raise ApiError(
            429,
            "rate_limited",
            f"more than {limiter.per_min} unlock/lock calls a minute with this API key; retry later",
            {"Retry-After": limiter.retry_after(wait)},
        )
    body = await read_json(request)
    unknown = set(body) - {"reservation_id"}
    if unknown:
        raise ApiError(422, "invalid_body", f"unknown field(s): {', '.join(sorted(unknown))}")
    rid = body.get("reservation_id")
    if rid is not None:
        if not isinstance(rid, str):
            raise ApiError(422, "invalid_body", "reservation_id: must be a string")
        check_id(rid)
    status, payload = await request.app[RUNTIME].booking.command(
        request.match_info["vehicle_id"],
        action,
        rid,
        request[API_KEY_ID],
        request.headers.get("Idempotency-Key"),
    )
    return web.Response(body=payload, status=status, content_type="application/json")


async def unlock(request: web.Request) -> web.Response:
    return await _command(request, "unlock")


async def lock(request: web.Request) -> web.Response:
    return await _command(request, "lock")


async def healthz(request: web.Request) -> web.Response:
    ok, body = health(request.app[RUNTIME].snapshot())
    return json_response(body, 200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    text = prometheus(request.app[RUNTIME].snapshot())
    return web.Response(text=text, content_type="text/plain", charset="utf-8", headers={"X-Format": "prometheus-0.0.4"})


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
    r.add_get("/v1/reservations", list_reservations)
    r.add_put("/v1/reservations/{reservation_id}", put_reservation)
    r.add_get("/v1/reservations/{reservation_id}", get_reservation)
    r.add_delete("/v1/reservations/{reservation_id}", delete_reservation)
