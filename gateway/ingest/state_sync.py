"""The cars' latest state shared between gateways through the store.

With a shared subscription each gateway hears a part of the fleet's
messages, yet each must answer ``GET /v1/vehicles`` for every car. So every
``ha.state_sync_s`` each gateway writes the cars that changed here, in one
batch (never per message: ingest runs at tens of thousands a second), and
reads back what changed in the store since its last look, newest reading
winning both ways. A car's state is thus at most about two sync periods
behind on any instance (one to be written, one to be read): 0.8 s with the
default 0.4 s, under the contract's 1 s (``bench/state_lag.py`` measures it).

Only with a store that several gateways share (PostgreSQL); on SQLite one
gateway has it all.
"""

from __future__ import annotations

import asyncio
import logging

from gateway.errors import StoreError
from gateway.ingest.state import FleetState
from gateway.ingest.telemetry import Reading
from gateway.store.base import Store, StoredReading

log = logging.getLogger(__name__)


class StateSync:
    def __init__(self, state: FleetState, store: Store, every_s: float) -> None:
        self.state = state
        self.store = store
        self.every_s = every_s
        self.cursor = 0
        self.failing = False

    async def run(self) -> None:
        # On a fixed beat, not a sleep after each turn: while turns are shorter than a period, a reading waits
        # at most a period to be written and a period to be read, which keeps the lag under the contract's 1 s.
        loop = asyncio.get_running_loop()
        beat = loop.time()
        while True:
            await self.sync_once()
            beat += self.every_s
            if beat < loop.time():
                # The store is slow: leave it half a period before the next turn rather than none (every
                # gateway would be at it back to back), and keep the beat from there, with no burst to catch up.
                beat = loop.time() + self.every_s / 2
            await asyncio.sleep(beat - loop.time())

    async def sync_once(self) -> None:
        dirty, self.state.dirty = self.state.dirty, set()
        readings: list[StoredReading] = []
        seen: dict[str, int] = {}
        for vid in dirty:
            st = self.state.vehicles[vid]
            readings += [StoredReading(vid, r.kind, r.ts_ms, r.fields) for r in st.readings.values()]
            if st.last_seen_ms is not None:
                seen[vid] = st.last_seen_ms
        try:
            own = await self.store.put_states(readings, seen)
            # Not our own batch back: reading it cost as much as writing it, for nothing to merge.
            rows, last_seen, self.cursor = await self.store.states_changed_since(self.cursor, own)
        except StoreError as e:
            self.state.dirty |= dirty  # shared at the next turn
            if not self.failing:
                log.error("state sync: %s; the other gateways' view of these cars lags until it works", e)
                self.failing = True
            return
        if self.failing:
            log.warning("state sync: working again")
            self.failing = False
        for row in rows:
            self.state.merge(Reading(row.kind, row.vehicle_id, row.ts_ms, row.fields))
        for vid, ms in last_seen.items():
            seen_here = self.state.vehicles.get(vid)
            if seen_here is not None and (seen_here.last_seen_ms is None or ms > seen_here.last_seen_ms):
                seen_here.last_seen_ms = ms
