"""Request and response bodies of the HTTP API, as pydantic models.

They are the API's one definition: requests are validated by them,
answers about reservations and commands are built through them, and the
OpenAPI document's schemas are generated from them
(``gateway/http/openapi.py``). Two answers are built elsewhere for speed
and checked against their model by ``tests/test_openapi.py``: the vehicle
view (``FleetState.view``, per reading) and the error body
(``gateway/http/problems.py``). Identifier patterns come from
``gateway/ids.py``. Times travel as RFC 3339 strings with an offset;
inside the gateway they are milliseconds since the epoch.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, WithJsonSchema

from gateway.ids import RESERVATION_ID, VEHICLE_ID
from gateway.rules.alerts import AlertType, Severity
from gateway.rules.commands import AuditResult, CommandRecord, Outcome, Source
from gateway.rules.events import EventType, command_doc, trip_doc
from gateway.rules.reservations import USER_ID_MAX, Kind, Reservation, ReservationRequest, StartUnlockStatus, status
from gateway.rules.trips import Trip
from gateway.times import iso_ms, rfc3339_ms

__all__ = [
    "CommandDone",
    "CommandIn",
    "CommandList",
    "CommandOut",
    "Error",
    "ReservationIn",
    "ReservationList",
    "ReservationOut",
    "Vehicle",
    "VehicleList",
]


def _to_ms(value: Any) -> Any:
    if not isinstance(value, str):
        raise ValueError("must be an RFC 3339 date-time string with offset")
    try:
        return rfc3339_ms(value)
    except ValueError as e:
        raise ValueError(f"{e}, e.g. 2026-11-26T09:00:00Z") from None


DATE_TIME = {"type": "string", "format": "date-time"}
# A time in a request: an RFC 3339 string outside, milliseconds inside.
TimeIn = Annotated[int, BeforeValidator(_to_ms), WithJsonSchema(DATE_TIME)]
TimeOut = Annotated[str, Field(json_schema_extra={"format": "date-time"})]
VehicleId = Annotated[str, StringConstraints(pattern=VEHICLE_ID.anchored)]
ReservationId = Annotated[str, StringConstraints(pattern=RESERVATION_ID.anchored)]


class _In(BaseModel):
    # Strict: "yes" is not a boolean and 5 is not a string.
    model_config = ConfigDict(strict=True, frozen=True)


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


class ErrorDetail(_Out):
    code: str = Field(description="snake_case, stable: what a program tests")
    message: str = Field(description="for a person")


class Error(_Out):
    error: ErrorDetail


class ReservationIn(_In):
    """The body of ``PUT /v1/reservations/{reservation_id}``. Unknown fields are ignored."""

    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")

    vehicle_id: VehicleId
    user_id: Annotated[str, StringConstraints(min_length=1, max_length=USER_ID_MAX)]
    starts_at: TimeIn
    ends_at: TimeIn
    kind: Kind
    unlock_at_start: bool = False

    def request(self) -> ReservationRequest:
        return ReservationRequest(
            self.vehicle_id, self.user_id, self.starts_at, self.ends_at, self.kind, self.unlock_at_start
        )


class StartUnlockOut(_Out):
    status: StartUnlockStatus
    at: TimeOut
    command_id: str | None
    reason: str | None


class ReservationOut(_Out):
    reservation_id: str
    vehicle_id: str
    user_id: str
    starts_at: TimeOut
    ends_at: TimeOut
    kind: Kind
    unlock_at_start: bool
    status: Literal["active", "cancelled", "completed"]
    created_at: TimeOut
    updated_at: TimeOut
    start_unlock: StartUnlockOut | None
    cancel_reason: str | None = Field(description="null unless cancelled: preempted_by_staff, or cancelled")

    @classmethod
    def of(cls, r: Reservation) -> ReservationOut:
        su = r.start_unlock
        return cls(
            cancel_reason=r.cancel_reason if r.cancelled else None,
            reservation_id=r.id,
            vehicle_id=r.vehicle_id,
            user_id=r.user_id,
            starts_at=iso_ms(r.starts_ms),
            ends_at=iso_ms(r.ends_ms),
            kind=r.kind,
            unlock_at_start=r.unlock_at_start,
            status=status(r),
            created_at=iso_ms(r.created_ms),
            updated_at=iso_ms(r.updated_ms),
            start_unlock=None
            if su is None
            else StartUnlockOut(status=su.status, at=iso_ms(su.at_ms), command_id=su.command_id, reason=su.reason),
        )


class DisplacedOut(_Out):
    reservation_id: str
    action: Literal["reassigned", "cancelled"]
    vehicle_id: str = Field(description="reassigned: the car it was moved to; cancelled: the car it had")


class ReservationPut(ReservationOut):
    """The answer to a PUT: the reservation, and the public ones a staff reservation moved or cancelled."""

    displaced: list[DisplacedOut]


class AvailableVehicle(_Out):
    vehicle_id: str
    model: str
    station: str
    soc_pct: float | None
    range_km: float | None


class Availability(_Out):
    vehicles: list[AvailableVehicle]


class ReservationList(_Out):
    reservations: list[ReservationOut]


class CommandIn(_In):
    """The body of unlock and lock. ``reservation_id`` is required to unlock."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")

    reservation_id: ReservationId | None = None


class CommandDone(_Out):
    command_id: str
    status: Literal["done"]
    latency_ms: float = Field(ge=0)
    locked: bool | None = Field(None, description="the car's lock state after the command, when it says")

    @classmethod
    def of(cls, o: Outcome) -> CommandDone:
        return cls(command_id=o.command_id, status="done", latency_ms=round(o.latency_ms, 1), locked=o.locked)


class CommandOut(_Out):
    """One line of the command audit."""

    command_id: str
    action: Literal["unlock", "lock"]
    reservation_id: str | None
    caller: str = Field(description="the name of the API key that asked (never the key itself)")
    source: Source
    issued_at: TimeOut
    result: AuditResult
    reason: str | None
    latency_ms: float | None

    @classmethod
    def of(cls, c: CommandRecord) -> CommandOut:
        return cls.model_validate(command_doc(c))


class CommandList(_Out):
    commands: list[CommandOut]


class EndIn(_In):
    """The body of ``POST /v1/reservations/{id}/end``, which may be empty."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")

    force: bool = Field(False, description="skip the checks (an operator's call); the trip records forced: true")


class TripStartOut(_Out):
    odometer_km: float | None
    soc_pct: float | None


class TripEndOut(_Out):
    odometer_km: float | None
    soc_pct: float | None
    at_station: bool


class TripOut(_Out):
    reservation_id: str
    vehicle_id: str
    user_id: str
    kind: Kind
    started_at: TimeOut
    ended_at: TimeOut | None
    ended_by: Literal["user", "auto"] | None
    forced: bool
    start: TripStartOut
    end: TripEndOut | None
    distance_km: float | None
    energy_kwh: float | None
    duration_min: float | None
    late_min: float | None
    billed_min: int | None
    amount_eur: float | None

    @classmethod
    def of(cls, t: Trip) -> TripOut:
        return cls.model_validate(trip_doc(t))


class TripList(_Out):
    trips: list[TripOut]


class UsageFigures(_Out):
    trips: int
    hours: float
    distance_km: float
    energy_kwh: float
    amount_eur: float
    fees_eur: float


class StationUsage(UsageFigures):
    station: str


class VehicleUsage(_Out):
    vehicle_id: str
    trips: int
    hours: float
    utilisation_pct: float


class UserUsage(_Out):
    user_id: str
    trips: int
    billed_min: int
    distance_km: float
    amount_eur: float
    fee_eur: float
    total_eur: float


class UsageReport(_Out):
    """The monthly usage statement; trips count in the month (billing time zone) where they started."""

    month: str
    currency: Literal["EUR"]
    totals: UsageFigures
    by_kind: dict[Kind, UsageFigures]
    by_station: list[StationUsage]
    by_vehicle: list[VehicleUsage]
    users: list[UserUsage]


Reading = dict[str, Any] | None


class StationOut(_Out):
    id: str
    town: str
    lat: float
    lon: float


class Vehicle(_Out):
    """Registry data and the latest readings; each reading carries the fields the car last sent and ``ts``."""

    vehicle_id: VehicleId
    model: str
    model_name: str
    station: StationOut
    battery: Reading
    location: Reading
    doors: Reading
    online: bool | None
    firmware: str | None
    last_seen: TimeOut | None


class VehicleList(_Out):
    vehicles: list[Vehicle]


class EventOut(_Out):
    """Something that happened, as listed and as sent to webhooks."""

    id: str = Field(description="evt_ and a ULID: sorts as recorded; the webhook-id of every delivery")
    type: EventType
    timestamp: TimeOut
    data: dict[str, Any] = Field(description="by type: the audit record, the trip, the alert, the reassignment")


class EventList(_Out):
    events: list[EventOut]
    next: str | None = Field(description="pass as `after` to get what follows (the `after` given when none)")


class AlertOut(_Out):
    id: str
    type: AlertType
    severity: Severity
    vehicle_id: str
    reservation_id: str | None
    opened_at: TimeOut
    resolved_at: TimeOut | None
    message: str
    details: dict[str, Any]


class AlertList(_Out):
    alerts: list[AlertOut]
