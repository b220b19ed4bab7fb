"""The per-message boundary: every car message is stored, rejected with a reason, or handed on.

:meth:`Ingest.handle` is paho's message callback. It is the one place that
catches broadly: whatever goes wrong with one message is counted and
recorded in `rejected`, and the next message is handled as usual.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from gateway.errors import PayloadError
from gateway.fleet import Fleet
from gateway.ingest.journal import Journal
from gateway.ingest.lineproto import DistinctTimes, excerpt, line, reading_line
from gateway.ingest.state import FleetState
from gateway.ingest.telemetry import (
    ACK,
    COMMANDS,
    KINDS,
    Limits,
    Reading,
    check_vehicle_id,
    decode_object,
    parse_topic,
    validate,
)

log = logging.getLogger(__name__)


class Message(Protocol):
    @property
    def topic(self) -> str: ...
    @property
    def payload(self) -> bytes | bytearray: ...
    @property
    def qos(self) -> int: ...
    @property
    def retain(self) -> bool: ...


AckHandler = Callable[[str, dict[str, object], int], None]
"""(vehicle_id, decoded ack, received_ms) -> None; raises PayloadError if the ack is invalid."""
ReadingHandler = Callable[[Reading, int], None]
"""(reading, received_ms) -> None: a live reading that became its car's latest (the alert monitor)."""


@dataclass
class IngestStats:
    received: int = 0
    accepted: int = 0
    rejected: int = 0
    rejected_by: Counter[tuple[str, str]] = field(default_factory=Counter)  # (reason, kind)


class Ingest:
    def __init__(
        self, fleet: Fleet, state: FleetState, journal: Journal, prefix: str, limits: Limits, on_ack: AckHandler
    ) -> None:
        self.fleet = fleet
        self.state = state
        self.journal = journal
        self.prefix = prefix
        self.limits = limits
        self.on_ack = on_ack
        self.stats = IngestStats()
        self.on_reading: ReadingHandler | None = None
        self._models = {vid: v.model for vid, v in fleet.vehicles.items()}
        self._times = DistinctTimes()

    def handle(self, msg: Message, token: int) -> None:
        """A message of the telemetry connection: stored, or rejected with a reason."""
        now_ms = int(time.time() * 1000)
        topic = parse_topic(msg.topic, self.prefix)
        if topic is not None and topic.kind in (COMMANDS, ACK):
            # Commands are not car data, and acks travel on the command connection (handle_ack).
            self.journal.add_mid(token)
            return
        self.stats.received += 1
        kind = topic.kind if topic is not None and topic.kind in KINDS else "unknown"
        vehicle_id = topic.vehicle_id if topic is not None else ""
        try:
            if kind == "unknown":
                raise PayloadError("unknown_topic", f"{msg.topic[:100]!r} is not a car topic")
            model = self._model(vehicle_id)
            doc = decode_object(msg.payload, self.limits)
            reading = validate(kind, vehicle_id, doc, now_ms, self.limits)
        except PayloadError as e:
            self._reject(e.reason, kind, vehicle_id, msg, now_ms, token, e.detail)
            return
        except Exception as e:  # the one broad catch: a bug must not stop ingest
            log.exception("unexpected error handling a message on %s", msg.topic[:100])
            self._reject("internal_error", kind, vehicle_id, msg, now_ms, token, repr(e))
            return
        self.stats.accepted += 1
        # A retained message (the status a car left behind, often its will) is delivered
        # when we subscribe: it says nothing about the car being heard from now, and
        # without its own ts it has no time of its own to be stored at.
        stale = msg.retain and "ts" not in doc
        if self.state.update(reading, None if msg.retain else now_ms) and not msg.retain and self.on_reading:
            try:
                self.on_reading(reading, now_ms)
            except Exception:  # the message is valid and is stored whatever the alert monitor makes of it
                log.exception("the alert monitor failed on a reading of %s", vehicle_id)
        point = None if stale else reading_line(reading, model)
        if point is None:
            self.journal.add_mid(token)
        else:
            self.journal.append(point, token, msg.qos)

    def handle_ack(self, msg: Message, token: int) -> None:
        """A car's command acknowledgement, from the command connection; rejected like telemetry if invalid.

        The command connection acknowledges it to the broker itself (`token` is unused):
        an ack has nothing to make durable, and must never wait behind telemetry.
        """
        now_ms = int(time.time() * 1000)
        topic = parse_topic(msg.topic, self.prefix)
        vehicle_id = topic.vehicle_id if topic is not None else ""
        self.stats.received += 1
        try:
            self._model(vehicle_id)
            self.on_ack(vehicle_id, decode_object(msg.payload, self.limits), now_ms)
        except PayloadError as e:
            self._reject(e.reason, ACK, vehicle_id, msg, now_ms, 0, e.detail)
            return
        except Exception as e:  # the same boundary as handle()
            log.exception("unexpected error handling an ack on %s", msg.topic[:100])
            self._reject("internal_error", ACK, vehicle_id, msg, now_ms, 0, repr(e))
            return
        self.stats.accepted += 1

    def _model(self, vehicle_id: str) -> str:
        check_vehicle_id(vehicle_id)
        model = self._models.get(vehicle_id)
        if model is None:
            raise PayloadError("unknown_vehicle", f"{vehicle_id} is not in the fleet registry")
        return model

    def _reject(
        self, reason: str, kind: str, vehicle_id: str, msg: Message, now_ms: int, token: int, detail: str
    ) -> None:
        self.stats.rejected += 1
        self.stats.rejected_by[(reason, kind)] += 1
        key = (reason, kind)
        ts = self._times.next(key, now_ms)  # every rejection its own point, so the count is right
        values = {
            "vehicle_id": vehicle_id[:64],
            "topic": msg.topic[:200],
            "excerpt": excerpt(msg.payload),
            "detail": detail[:200],
        }
        self.journal.append(line("rejected", {"reason": reason, "kind": kind}, values, ts), token, msg.qos)
        if self.stats.rejected_by[key] == 1 or log.isEnabledFor(logging.DEBUG):
            log.info("rejected %s message on %s: %s (%s)", kind, msg.topic[:100], reason, detail[:200])
