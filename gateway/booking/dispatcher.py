"""Signed lock/unlock commands to cars and their acknowledgements.

Each command waits on its own future, keyed by ``command_id``, so any
number can be in flight at once with no lock. A command's ``expires_at`` is
its issue time plus the ack timeout: once the HTTP caller has been told
``vehicle_timeout`` the car can no longer act on it, even if it comes back
online later (the broker drops it too, through the MQTT 5 message expiry).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import orjson

from gateway.errors import PayloadError
from gateway.ingest.journal import Journal
from gateway.ingest.lineproto import DistinctTimes, line
from gateway.mqtt.link import MqttLink
from gateway.signing import sign, vehicle_key

Action = Literal["unlock", "lock"]
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
    """The contract's command payload, signed with the car's own key. Pure."""
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
    command_id: str
    vehicle_id: str
    action: Action
    result: Literal["done", "rejected", "failed", "timeout"]
    reason: str | None
    latency_ms: float
    locked: bool | None = None


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
    return Ack(cid, str(status), reason[:100] if reason else None, locked)


class CommandDispatcher:
    def __init__(self, link: MqttLink, journal: Journal, master_key: str, prefix: str, timeout_s: float, qos: int = 1):
        self.link = link
        self.journal = journal
        self._master_key = master_key
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.qos = qos
        self._waiting: dict[str, tuple[str, asyncio.Future[Ack]]] = {}
        self.results: Counter[str] = Counter()
        self.unmatched_acks = 0
        self._times = DistinctTimes()

    @property
    def in_flight(self) -> int:
        return len(self._waiting)

    async def send(self, vehicle_id: str, action: Action, reservation_id: str | None) -> Outcome:
        """Publish a signed command and wait for the car's ack or the timeout.

        Raises BrokerUnavailable at once if the broker is not connected.
        """
        cmd = build_command(self._master_key, vehicle_id, action, reservation_id, datetime.now(UTC), self.timeout_s)
        cid = cmd["command_id"]
        fut: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        self._waiting[cid] = (vehicle_id, fut)
        t0 = time.perf_counter()
        try:
            self.link.publish(f"{self.prefix}/{vehicle_id}/commands", orjson.dumps(cmd), self.qos, self.timeout_s)
            try:
                async with asyncio.timeout(self.timeout_s):
                    ack = await fut
            except TimeoutError:
                outcome = Outcome(cid, vehicle_id, action, "timeout", "vehicle_timeout", _ms(t0))
            else:
                result: Any = ack.status
                outcome = Outcome(cid, vehicle_id, action, result, ack.reason, _ms(t0), ack.locked)
        finally:
            self._waiting.pop(cid, None)
        self._record(outcome, reservation_id)
        return outcome

    def on_ack(self, vehicle_id: str, doc: dict[str, Any], received_ms: int) -> None:
        ack = parse_ack(doc)
        waiting = self._waiting.get(ack.command_id)
        if waiting is None:
            # Late (after the timeout) or another gateway instance's: not bad input, just not ours.
            self.unmatched_acks += 1
            return
        expected_vehicle, fut = waiting
        if expected_vehicle != vehicle_id:
            raise PayloadError("vehicle_mismatch", f"ack for a command to {expected_vehicle} came from {vehicle_id}")
        if not fut.done():
            fut.set_result(ack)

    def _record(self, o: Outcome, reservation_id: str | None) -> None:
        self.results[o.result] += 1
        values: dict[str, Any] = {"command_id": o.command_id, "latency_ms": round(o.latency_ms, 3)}
        if reservation_id is not None:
            values["reservation_id"] = reservation_id
        tags = {"vehicle_id": o.vehicle_id, "action": o.action, "result": o.result}
        ts = self._times.next((o.vehicle_id, o.action, o.result), int(time.time() * 1000))
        self.journal.append(line("commands", tags, values, ts))


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000
