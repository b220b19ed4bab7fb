"""Commands to the cars as values: the signed payload, the car's ack, the outcome and its audit record. Pure."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from gateway.errors import PayloadError
from gateway.signing import sign, vehicle_key

Action = Literal["unlock", "lock"]
Result = Literal["done", "rejected", "failed", "timeout"]
# What the audit records: a car's answer, no answer, or nothing sent because the broker was down.
AuditResult = Literal["done", "rejected", "failed", "timeout", "broker_unavailable"]
Source = Literal["api", "start_unlock", "end_of_rental", "operator"]
ACK_STATUSES = ("done", "rejected", "failed")


def rfc3339_ms(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def build_command(
    master_key: str,
    vehicle_id: str,
    action: Action,
    reservation_id: str | None,
    now: datetime,
    lifetime_s: float,
    command_id: str | None = None,
) -> dict[str, Any]:
    """The contract's command payload, signed with the car's own key."""
    cmd: dict[str, Any] = {
        "command_id": command_id or str(uuid.uuid4()),
        "vehicle_id": vehicle_id,
        "action": action,
        "reservation_id": reservation_id,
        "issued_at": rfc3339_ms(now),
        "expires_at": rfc3339_ms(now + timedelta(seconds=lifetime_s)),
    }
    cmd["signature"] = sign(cmd, vehicle_key(master_key, vehicle_id))
    return cmd


@dataclass(frozen=True)
class Outcome:
    """How a command sent to a car ended."""

    command_id: str
    vehicle_id: str
    action: Action
    result: Result
    reason: str | None
    latency_ms: float
    locked: bool | None = None
    issued_ms: int = 0

    def to_doc(self) -> dict[str, Any]:
        """A JSON-able form, for the idempotency record."""
        return {
            "command_id": self.command_id,
            "vehicle_id": self.vehicle_id,
            "action": self.action,
            "result": self.result,
            "reason": self.reason,
            "latency_ms": self.latency_ms,
            "locked": self.locked,
            "issued_ms": self.issued_ms,
        }

    @classmethod
    def from_doc(cls, d: dict[str, Any]) -> Outcome:
        return cls(
            str(d["command_id"]),
            str(d["vehicle_id"]),
            d["action"],
            d["result"],
            d.get("reason"),
            float(d["latency_ms"]),
            d.get("locked"),
            int(d.get("issued_ms", 0)),
        )


@dataclass(frozen=True)
class CommandRecord:
    """One line of the audit: who asked which car to do what, and how it ended."""

    command_id: str
    vehicle_id: str
    action: Action
    reservation_id: str | None
    caller: str
    source: Source
    issued_ms: int
    result: AuditResult
    reason: str | None
    latency_ms: float | None

    @classmethod
    def of(cls, o: Outcome, reservation_id: str | None, caller: str, source: Source) -> CommandRecord:
        return cls(
            o.command_id, o.vehicle_id, o.action, reservation_id, caller, source, o.issued_ms, o.result, o.reason,
            round(o.latency_ms, 1),
        )  # fmt: skip

    @classmethod
    def not_sent(
        cls,
        command_id: str,
        vehicle_id: str,
        action: Action,
        reservation_id: str | None,
        caller: str,
        source: Source,
        now_ms: int,
    ) -> CommandRecord:
        """The broker was down: nothing reached the car, and the audit says so."""
        return cls(
            command_id, vehicle_id, action, reservation_id, caller, source, now_ms, "broker_unavailable",
            "broker_unavailable", None,
        )  # fmt: skip


@dataclass(frozen=True)
class Ack:
    command_id: str
    status: str
    reason: str | None
    locked: bool | None


def parse_ack(doc: dict[str, Any]) -> Ack:
    cid = doc.get("command_id")
    if not isinstance(cid, str) or not cid:
        raise PayloadError("missing_field", "ack needs command_id")
    status = doc.get("status")
    if status not in ACK_STATUSES:
        raise PayloadError("bad_type", f"ack status must be one of {', '.join(ACK_STATUSES)}")
    reason = doc.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise PayloadError("bad_type", "ack reason must be a string")
    locked = doc.get("locked")
    if locked is not None and not isinstance(locked, bool):
        raise PayloadError("bad_type", "ack locked must be true or false")
    # Without U+0000, which PostgreSQL refuses in text: one such ack would hold up the audit behind it.
    return Ack(cid, str(status), reason[:100].replace("\x00", "") if reason else None, locked)


def fingerprint(action: Action, vehicle_id: str, reservation_id: str | None) -> str:
    """What makes two requests under one Idempotency-Key the same request."""
    return hashlib.sha256(f"{action}|{vehicle_id}|{reservation_id}".encode()).hexdigest()
