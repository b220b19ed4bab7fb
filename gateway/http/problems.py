"""Domain errors and command outcomes turned into HTTP answers: the one table.

Every error leaves as ``{"error": {"code": …, "message": …}}``, plus the
extra fields a code promises (``reason`` and ``command_id`` of a car's
refusal). The table is looked up along the error's class hierarchy, so a
new subclass answers like its parent until it gets a row of its own.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web
from pydantic import ValidationError

from gateway.errors import (
    BrokerUnavailable,
    DomainError,
    EndChecksFailed,
    IdempotencyKeyReused,
    InvalidBody,
    InvalidIdempotencyKey,
    InvalidInput,
    InvalidMonth,
    InvalidQuery,
    InvalidReservation,
    NotFound,
    NoTrip,
    RateLimited,
    ReservationCancelled,
    ReservationConflict,
    ReservationNotActive,
    StoreError,
    UnknownReservation,
    UnknownVehicle,
)
from gateway.http.ratelimit import RateLimiter
from gateway.http.schemas import CommandDone
from gateway.rules.commands import Outcome

__all__ = ["STATUS", "HttpProblem", "error_response", "outcome_response", "problem_response", "validation_problem"]

# error class -> (HTTP status, the contract's code)
STATUS: dict[type[Exception], tuple[int, str]] = {
    UnknownVehicle: (404, "unknown_vehicle"),
    UnknownReservation: (404, "unknown_reservation"),
    NoTrip: (404, "no_trip"),
    NotFound: (404, "not_found"),
    InvalidReservation: (422, "invalid_reservation"),
    InvalidBody: (422, "invalid_body"),
    InvalidQuery: (400, "bad_query"),
    InvalidIdempotencyKey: (400, "bad_idempotency_key"),
    InvalidMonth: (422, "invalid_month"),
    InvalidInput: (422, "invalid_input"),
    IdempotencyKeyReused: (422, "idempotency_key_reused"),
    ReservationConflict: (409, "reservation_conflict"),
    ReservationCancelled: (409, "reservation_cancelled"),
    ReservationNotActive: (409, "reservation_not_active"),
    EndChecksFailed: (409, "end_checks_failed"),
    RateLimited: (429, "rate_limited"),
    DomainError: (400, "bad_request"),
    BrokerUnavailable: (503, "broker_unavailable"),
    StoreError: (503, "store_unavailable"),
}


class HttpProblem(Exception):
    """An answer decided by the HTTP layer itself (bad JSON, no API key, body too large)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json", headers=headers)


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> web.Response:
    return json_response({"error": {"code": code, "message": message, **extra}}, status, headers)


def problem_response(e: Exception) -> web.Response | None:
    """The answer for a domain or gateway error, or None if it is not one of ours."""
    for cls in type(e).__mro__:
        if cls in STATUS:
            status, code = STATUS[cls]
            break
    else:
        return None
    message = e.message if isinstance(e, DomainError) else str(e)
    if isinstance(e, BrokerUnavailable):
        message = f"cannot reach the cars right now: {e}"
    headers = None
    if isinstance(e, RateLimited):
        headers = {"Retry-After": RateLimiter.retry_after(e.retry_after_s)}
    extra = e.extra() if isinstance(e, DomainError) else {}
    return error_response(status, code, message, headers, **extra)


def validation_problem(e: ValidationError, cls: type[InvalidInput]) -> InvalidInput:
    """The first problem pydantic found, as the domain error of that body, naming the field."""
    first = e.errors(include_url=False)[0]
    field = ".".join(str(p) for p in first["loc"]) or "body"
    msg = str(first["msg"]).removeprefix("Value error, ")
    if first["type"] == "missing":
        msg = "is required"
    elif first["type"] == "extra_forbidden":
        msg = "unknown field"
    return cls(field, msg)


def outcome_response(o: Outcome) -> web.Response:
    """The contract's answer for a command outcome: 200, 502 with the car's reason, or 504."""
    if o.result == "done":
        return json_response(CommandDone.of(o).model_dump(exclude_none=True))
    if o.result == "timeout":
        msg = f"{o.vehicle_id} did not answer within the timeout; the command has expired and will not run later"
        return error_response(504, "vehicle_timeout", msg, command_id=o.command_id)
    code = "command_rejected" if o.result == "rejected" else "command_failed"
    verb = "refused" if o.result == "rejected" else "could not carry out"
    msg = f"{o.vehicle_id} {verb} the {o.action}: {o.reason or 'no reason given'}"
    return error_response(502, code, msg, reason=o.reason, command_id=o.command_id)
