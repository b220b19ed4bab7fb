"""Signed lock/unlock commands to cars over MQTT, and their acknowledgements.

Each command waits on its own future, keyed by ``command_id``, so any
number can be in flight at once with no lock. A command's ``expires_at`` is
its issue time plus the ack timeout: once the caller has been told
``timeout`` the car can no longer act on it, even if it comes back online
later (the broker drops it too, through the MQTT 5 message expiry).

:class:`CommandDispatcher` is the real :class:`~gateway.booking.service.CommandSender`;
unit tests of the booking rules use a small scripted one instead.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from typing import Any

import orjson

from gateway.errors import BrokerUnavailable, PayloadError
from gateway.ingest.journal import Journal
from gateway.ingest.lineproto import DistinctTimes, line
from gateway.mqtt.link import MqttLink
from gateway.rules.commands import Ack, Action, Outcome, build_command, parse_ack


class CommandDispatcher:
    def __init__(
        self,
        link: MqttLink,
        journal: Journal,
        master_key: str,
        prefix: str,
        timeout_s: float,
        qos: int = 1,
        observe: Callable[[float], None] | None = None,
    ):
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
        self._observe = observe  # the command-duration histogram, in seconds

    @property
    def in_flight(self) -> int:
        return len(self._waiting)

    async def send(
        self, vehicle_id: str, action: Action, reservation_id: str | None, caller: str, command_id: str | None = None
    ) -> Outcome:
        """Publish a signed command and wait for the car's ack or the timeout.

        Raises BrokerUnavailable at once if the broker is not connected.
        """
        now = datetime.now(UTC)
        cmd = build_command(self._master_key, vehicle_id, action, reservation_id, now, self.timeout_s, command_id)
        issued_ms = int(now.timestamp() * 1000)
        cid = cmd["command_id"]
        fut: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        self._waiting[cid] = (vehicle_id, fut)
        t0 = time.perf_counter()
        try:
            self.link.publish(
                f"{self.prefix}/{vehicle_id}/commands", orjson.dumps(cmd), self.qos, self.timeout_s,
                # held back for the broker's window, then lost with the connection: 503 now, not a timeout later
                on_dropped=partial(_fail, fut),
            )  # fmt: skip
            try:
                async with asyncio.timeout(self.timeout_s):
                    ack = await fut
            except TimeoutError:
                outcome = Outcome(cid, vehicle_id, action, "timeout", "vehicle_timeout", _ms(t0), None, issued_ms)
            else:
                result: Any = ack.status
                outcome = Outcome(cid, vehicle_id, action, result, ack.reason, _ms(t0), ack.locked, issued_ms)
        finally:
            self._waiting.pop(cid, None)
        self._record(outcome, reservation_id, caller)
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

    def _record(self, o: Outcome, reservation_id: str | None, caller: str) -> None:
        self.results[o.result] += 1
        if self._observe is not None:
            self._observe(o.latency_ms / 1000)
        values: dict[str, Any] = {"command_id": o.command_id, "latency_ms": round(o.latency_ms, 3), "caller": caller}
        if reservation_id is not None:
            values["reservation_id"] = reservation_id
        tags = {"vehicle_id": o.vehicle_id, "action": o.action, "result": o.result}
        ts = self._times.next((o.vehicle_id, o.action, o.result), int(time.time() * 1000))
        self.journal.append(line("commands", tags, values, ts))


def _fail(fut: asyncio.Future[Ack], e: BrokerUnavailable) -> None:
    if not fut.done():
        fut.set_exception(e)


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000
