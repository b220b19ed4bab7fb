"""HTTP plumbing: the error body, API-key auth, and JSON helpers.

Every error leaves as ``{"error": {"code": …, "message": …}}``. Domain
errors are turned into HTTP answers here, in one place; an unexpected
exception is logged with its traceback and answered 500 with no detail.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware

from gateway.errors import ApiError, BrokerUnavailable

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# A stable, non-secret label of the caller's API key (rate limits, logs).
API_KEY_ID = web.RequestKey("api_key_id", str)


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json", headers=headers)


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return json_response({"error": {"code": code, "message": message}}, status, headers)


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
}


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as e:
        return error_response(e.status, e.code, e.message, e.headers)
    except BrokerUnavailable as e:
        return error_response(503, "broker_unavailable", f"cannot reach the cars right now: {e}")
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = _HTTP_CODES.get(e.status, "http_error")
        message = e.text if e.text and not e.text.startswith(f"{e.status}:") else e.reason
        return error_response(e.status, code, message or e.reason, {k: v for k, v in e.headers.items() if k == "Allow"})
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal_error", "the gateway hit an internal error; it has been logged")


def auth_middleware(keys: tuple[str, ...]) -> Middleware:
    encoded = [k.encode() for k in keys]

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/v1/") or request.path == "/v1":
            header = request.headers.get("Authorization", "")
            scheme, _, token = header.partition(" ")
            given = token.strip().encode()
            # Compare against every key, always, in constant time per key.
            ok = False
            for k in encoded:
                ok |= hmac.compare_digest(given, k)
            if scheme.lower() != "bearer" or not ok:
                raise ApiError(
                    401,
                    "unauthorized",
                    "missing or invalid API key (Authorization: Bearer <key>)",
                    {"WWW-Authenticate": "Bearer"},
                )
            request[API_KEY_ID] = _key_id(given)
        return await handler(request)

    return middleware


def _key_id(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:12]


async def read_json(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object, or a 400 that says what is wrong with it."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, "body_too_large", "request body is larger than the gateway accepts") from None
    if not raw:
        raise ApiError(400, "bad_json", "request body is empty; a JSON object is expected")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise ApiError(400, "bad_json", f"request body is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ApiError(422, "invalid_body", "request body must be a JSON object")
    return doc
