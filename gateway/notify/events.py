"""The event log: makes each event, says which endpoints want it, and tells who listens once it is stored.

Whoever records an event passes it to the store together with the change it
describes (one transaction: a trip that ended has its ``trip.ended``), then
calls :meth:`EventLog.recorded`, which wakes the webhook deliveries and the
listeners in this process (the alert monitor follows trips this way).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from gateway.rules.events import Event, EventType, UlidSource, make_event, wanted_by
from gateway.times import now_ms

__all__ = ["EventLog"]

log = logging.getLogger(__name__)

Listener = Callable[[Event], None]


class EventLog:
    def __init__(self, endpoints: Mapping[str, Iterable[str]] | None = None, clock: Callable[[], int] = now_ms) -> None:
        """`endpoints`: each webhook URL and the event types it wants (``"*"`` for all)."""
        self.endpoints = {url: tuple(types) for url, types in (endpoints or {}).items()}
        self.clock = clock
        self._ids = UlidSource()
        self._listeners: list[Listener] = []
        self._targets: dict[str, tuple[str, ...]] = {}

    def new(self, type_: EventType, data: dict[str, Any], ts_ms: int | None = None) -> Event:
        ts = self.clock() if ts_ms is None else ts_ms
        targets = self._targets.get(type_)
        if targets is None:
            targets = self._targets[type_] = tuple(u for u, types in self.endpoints.items() if wanted_by(types, type_))
        return make_event("evt_" + self._ids.new(ts), type_, ts, data, targets)

    def disable(self, url: str) -> None:
        """No more events for this endpoint (it answered 410): they would only pile up in the outbox."""
        self.endpoints.pop(url, None)
        self._targets.clear()

    def new_id(self, prefix: str, ts_ms: int) -> str:
        """An id of the same kind for something else (``alr_…`` for an alert)."""
        return prefix + self._ids.new(ts_ms)

    def listen(self, fn: Listener) -> None:
        self._listeners.append(fn)

    def recorded(self, e: Event | None) -> None:
        """`e` is in the store: tell the listeners (webhook deliveries among them)."""
        if e is None:
            return
        for fn in self._listeners:
            try:
                fn(e)
            except Exception:  # a listener's bug must not undo what was recorded
                log.exception("event listener failed on %s %s", e.type, e.id)
