"""Every HTTP route of the gateway, in one place."""

from __future__ import annotations

from aiohttp import web

from gateway.api import error_response, json_response
from gateway.app import RUNTIME
from gateway.errors import ApiError
from gateway.metrics import health, prometheus
from gateway.openapi import openapi_document


async def list_vehicles(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    return json_response({"vehicles": [rt.state.view(vid) for vid in rt.fleet.vehicles]})


async def get_vehicle(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    vid = request.match_info["vehicle_id"]
    if vid not in rt.fleet.vehicles:
        raise ApiError(404, "unknown_vehicle", f"no vehicle {vid[:40]!r} in the fleet registry")
    return json_response(rt.state.view(vid))


async def healthz(request: web.Request) -> web.Response:
    ok, body = health(request.app[RUNTIME].snapshot())
    return json_response(body, 200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    text = prometheus(request.app[RUNTIME].snapshot())
    return web.Response(text=text, content_type="text/plain", charset="utf-8", headers={"X-Format": "prometheus-0.0.4"})


async def openapi(request: web.Request) -> web.Response:
    return json_response(openapi_document())


async def not_found(request: web.Request) -> web.Response:
    return error_response(404, "not_found", f"no route {request.path[:100]}")


def setup_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/healthz", healthz)
    r.add_get("/metrics", metrics)
    r.add_get("/openapi.json", openapi)
    r.add_get("/v1/vehicles", list_vehicles)
    r.add_get("/v1/vehicles/{vehicle_id}", get_vehicle)
