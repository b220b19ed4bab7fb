"""The gateway's errors, in one small tree.

    GatewayError
     ├── ConfigError              invalid settings or fleet file; start-up stops (exit 2)
     ├── StartupError             a resource cannot be opened at start; start-up stops (exit 2)
     ├── PayloadError             a car message broke the contract; carries `reason`
     ├── SinkError                InfluxDB did not take a batch
     │    ├── SinkUnavailable     connection refused, timeout, 5xx: retry later
     │    └── SinkRejected        4xx, the data itself is bad: drop and count
     ├── BrokerUnavailable        the MQTT broker is not connected right now
     ├── StoreError               the store (database) failed an operation
     │    └── StaleRead           a row changed between our read and our write: read again
     └── DomainError              a request the booking rules refuse
          ├── NotFound
          │    ├── UnknownVehicle
          │    ├── UnknownReservation
          │    └── NoTrip
          ├── InvalidInput         carries `field`
          │    ├── InvalidReservation
          │    ├── InvalidBody
          │    ├── InvalidQuery
          │    ├── InvalidMonth
          │    └── InvalidIdempotencyKey
          ├── IdempotencyKeyReused
          ├── Conflict
          │    ├── ReservationConflict     carries the reservation in the way
          │    ├── ReservationCancelled
          │    ├── ReservationNotActive
          │    └── EndChecksFailed     carries the checks that failed
          └── RateLimited          carries `retry_after_s`

Domain errors say what is wrong in the booking system's terms and know
nothing of HTTP: ``gateway/http/problems.py`` holds the one table that maps
each to a status and the contract's ``code``. Errors from libraries below
(sqlite3, aiohttp, OS) are converted at the boundary where they are caught,
with ``raise … from``.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """The configuration is invalid. The message names the key and the problem."""


class StartupError(GatewayError):
    """Something the gateway needs could not be opened at start. The message names it and why."""


class PayloadError(GatewayError):
    """A car message is invalid. ``reason`` is the label counted and stored in `rejected`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class SinkError(GatewayError):
    """A write to InfluxDB failed."""


class SinkUnavailable(SinkError):
    """InfluxDB could not be reached or answered 5xx; the batch is kept and retried."""


class SinkRejected(SinkError):
    """InfluxDB refused the batch as invalid; retrying cannot help."""


class BrokerUnavailable(GatewayError):
    """The MQTT connection is down, so a command cannot be sent."""


class StoreError(GatewayError):
    """The store could not carry out an operation (disk, database)."""


class StaleRead(StoreError):
    """What a write was based on changed before it committed (another request, another gateway): nothing was
    written; read again and decide again."""


class DomainError(GatewayError):
    """A request that the booking rules refuse. ``message`` is for a person."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def extra(self) -> dict[str, object]:
        """Fields the error body carries beside ``code`` and ``message``."""
        return {}


class NotFound(DomainError):
    pass


class UnknownVehicle(NotFound):
    def __init__(self, vehicle_id: str) -> None:
        super().__init__(f"no vehicle {vehicle_id[:40]!r} in the fleet registry")
        self.vehicle_id = vehicle_id


class UnknownReservation(NotFound):
    def __init__(self, reservation_id: str) -> None:
        super().__init__(f"no reservation {reservation_id[:64]!r}")
        self.reservation_id = reservation_id


class NoTrip(NotFound):
    """The reservation exists, but its car was never unlocked."""


class InvalidInput(DomainError):
    """A field of a request is wrong; the message starts with the field's name."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class InvalidReservation(InvalidInput):
    """A reservation's body or id breaks the rules."""


class InvalidBody(InvalidInput):
    """An unlock or lock body is wrong."""


class InvalidQuery(InvalidInput):
    """A query parameter is unknown or out of range."""


class InvalidIdempotencyKey(InvalidInput):
    pass


class InvalidMonth(InvalidInput):
    """A usage statement's month is not ``YYYY-MM``."""


class IdempotencyKeyReused(DomainError):
    """The key was used, or is in use, for a different request."""


class Conflict(DomainError):
    pass


class ReservationConflict(Conflict):
    """The car is already reserved by ``other_id`` for an overlapping span."""

    def __init__(self, message: str, other_id: str) -> None:
        super().__init__(message)
        self.other_id = other_id


class ReservationCancelled(Conflict):
    """A cancelled reservation cannot be changed; the booking system must use a new id."""


class ReservationNotActive(Conflict):
    """The reservation cannot open this car now (not started, ended, cancelled, or another car)."""


class EndChecksFailed(Conflict):
    """The car cannot be returned yet; ``failed`` names the checks, in the contract's order."""

    def __init__(self, failed: list[str]) -> None:
        super().__init__(f"the car cannot be returned yet: {', '.join(failed)} (see `failed`)")
        self.failed = failed

    def extra(self) -> dict[str, object]:
        return {"failed": self.failed}


class RateLimited(DomainError):
    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
