"""What the booking system and operators read back: the event log and the alerts."""

from __future__ import annotations

from typing import get_args

from gateway.errors import InvalidQuery, UnknownVehicle
from gateway.fleet import Fleet
from gateway.ids import EVENT_ID
from gateway.rules.alerts import ALERT_TYPES, Alert
from gateway.rules.events import EVENT_TYPES, Event
from gateway.store.base import AlertStatus, Store

__all__ = ["Feed"]

STATUSES: tuple[str, ...] = get_args(AlertStatus)


class Feed:
    def __init__(self, store: Store, fleet: Fleet) -> None:
        self.store = store
        self.fleet = fleet

    async def events(self, after: str | None, type_: str | None, limit: int) -> list[Event]:
        if after is not None and not EVENT_ID.matches(after):
            raise InvalidQuery("after", f"an event id: {EVENT_ID.describe}")
        if type_ is not None and type_ not in EVENT_TYPES:
            raise InvalidQuery("type", f"one of {', '.join(EVENT_TYPES)}")
        return await self.store.list_events(after, type_, limit)

    async def alerts(self, status: str, vehicle_id: str | None, type_: str | None, limit: int) -> list[Alert]:
        if status not in STATUSES:
            raise InvalidQuery("status", f"one of {', '.join(STATUSES)}")
        if type_ is not None and type_ not in ALERT_TYPES:
            raise InvalidQuery("type", f"one of {', '.join(ALERT_TYPES)}")
        if vehicle_id is not None and vehicle_id not in self.fleet.vehicles:
            raise UnknownVehicle(vehicle_id)
        st: AlertStatus = "open" if status == "open" else "resolved" if status == "resolved" else "all"
        return await self.store.list_alerts(st, vehicle_id, type_, limit)
