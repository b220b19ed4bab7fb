"""HTTP plumbing: the error body, API-key auth, and reading a JSON body.

An error raised anywhere below a handler is answered here, in one place,
through the table of ``gateway/http/problems.py``; an unexpected exception
is logged with its traceback and answered 500 with no detail.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware

from gateway.http.problems import HttpProblem, error_response, problem_response
from gateway.settings import ApiKey

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# The name of the caller's API key: the audit's `caller`, the rate limit's and idempotency's scope.
CALLER = web.RequestKey("caller", str)

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
    except HttpProblem as e:
        return error_response(e.status, e.code, e.message, e.headers)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = _HTTP_CODES.get(e.status, "http_error")
        message = e.text if e.text and not e.text.startswith(f"{e.status}:") else e.reason
        return error_response(e.status, code, message or e.reason, {k: v for k, v in e.headers.items() if k == "Allow"})
    except Exception as e:
        answer = problem_response(e)
        if answer is not None:
            return answer
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal_error", "the gateway hit an internal error; it has been logged")


def auth_middleware(keys: Sequence[ApiKey]) -> Middleware:
    encoded = [(k.name, k.secret.get_secret_value().encode()) for k in keys]

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/v1/") or request.path == "/v1":
            header = request.headers.get("Authorization", "")
            scheme, _, token = header.partition(" ")
            given = token.strip().encode()
            # Compare against every key, always, in constant time per key.
            caller = None
            for name, secret in encoded:
                if hmac.compare_digest(given, secret) and caller is None:
                    caller = name
            if scheme.lower() != "bearer" or caller is None:
                raise HttpProblem(
                    401,
                    "unauthorized",
                    "missing or invalid API key (Authorization: Bearer <key>)",
                    {"WWW-Authenticate": "Bearer"},
                )
            request[CALLER] = caller
        return await handler(request)

    return middleware


async def read_json(request: web.Request, optional: bool = False) -> Any:
    """The body as parsed JSON, or a 400/413 that says what is wrong with it."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise HttpProblem(413, "body_too_large", "request body is larger than the gateway accepts") from None
    if not raw:
        if optional:
            return {}
        raise HttpProblem(400, "bad_json", "request body is empty; a JSON object is expected")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise HttpProblem(400, "bad_json", f"request body is not valid JSON: {e}") from None
