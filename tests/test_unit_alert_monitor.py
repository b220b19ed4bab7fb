"""The alert monitor with an injected clock and the real SQLite store, no broker: dedup, replays, streaks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from gateway.fleet import Fleet, load_fleet
from gateway.ingest.state import FleetState
from gateway.ingest.telemetry import Reading
from gateway.notify.alerts import AlertMonitor
from gateway.notify.events import EventLog
from gateway.rules.alerts import Alert, Thresholds
from gateway.store.sqlite import SqliteStore, open_sqlite
from tests.helpers import REPO

FLEET: Fleet = load_fleet(REPO / "config" / "fleet.yaml")
T0 = 1_795_683_600_000
HOME = (48.4318, 0.0949)


class Clock:
    def __init__(self) -> None:
        self.ms = T0

    def __call__(self) -> int:
        return self.ms


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[tuple[AlertMonitor, SqliteStore, Clock, list[bytes]]]:
    store = open_sqlite(tmp_path / "s.sqlite3")
    clock = Clock()
    points: list[bytes] = []
    events = EventLog({"http://rx/": ("*",)}, clock=clock)
    th = Thresholds(silent_after_ms=60_000, unattended_after_ms=10_000)
    m = AlertMonitor(store, FLEET, FleetState(FLEET), events, points.append, th, 120, 1.0, clock=clock)
    await m.load()
    m.broker(True, 1)
    yield m, store, clock, points
    await store.close()


def location(ts: int, lat: float = HOME[0], speed: float = 0.0, vid: str = "ZOE-001") -> Reading:
    return Reading("location", vid, ts, {"lat": lat, "lon": HOME[1], "speed_kmh": speed})


def doors(ts: int, locked: bool, vid: str = "ZOE-001") -> Reading:
    return Reading("doors", vid, ts, {"locked": locked, "closed": True})


async def flush(m: AlertMonitor) -> None:
    while not m._queue.empty():
        await m._record(m._queue.get_nowait())


async def test_a_burst_of_readings_opens_one_alert(parts: tuple[AlertMonitor, SqliteStore, Clock, list[bytes]]) -> None:
    m, store, clock, points = parts
    for i in range(50):
        m.observe(location(clock.ms + i, speed=40.0), clock.ms + i)
    await flush(m)
    [a] = await store.list_alerts("open", None, None, 10)
    assert a.type == "moved_without_trip"
    [e] = await store.list_events(None, "alert.opened", 10)
    assert e.targets == () and orjson.loads(e.body)["data"]["id"] == a.id
    assert await store.webhook_backlog() == 1
    assert len(points) == 1 and points[0].startswith(b"alerts,")


async def test_a_replayed_reading_is_not_seen(parts: tuple[AlertMonitor, SqliteStore, Clock, list[bytes]]) -> None:
    m, store, clock, _ = parts
    m.observe(location(clock.ms - 121_000, speed=90.0), clock.ms)
    await flush(m)
    assert m.replayed == 1 and await store.list_alerts("all", None, None, 10) == []
    m.observe(location(clock.ms - 119_000, speed=90.0), clock.ms)  # within the window: current
    await flush(m)
    assert len(await store.list_alerts("open", None, None, 10)) == 1


async def test_unattended_counts_from_the_first_unlocked_reading(
    parts: tuple[AlertMonitor, SqliteStore, Clock, list[bytes]],
) -> None:
    m, store, clock, _ = parts
    m.observe(doors(clock.ms, locked=False), clock.ms)
    clock.ms += 6_000
    m.observe(doors(clock.ms, locked=False), clock.ms)  # still unlocked: the streak goes on from the first
    await m.check()
    await flush(m)
    assert await store.list_alerts("open", None, None, 10) == []
    clock.ms += 4_000
    await m.check()
    await flush(m)
    [a] = await store.list_alerts("open", None, None, 10)
    assert a.type == "unlocked_unattended" and a.details["since_ms"] == T0
    m.observe(doors(clock.ms, locked=True), clock.ms)
    await m.check()
    await flush(m)
    assert await store.list_alerts("open", None, None, 10) == []
    assert [e.type for e in await store.list_events(None, None, 10)] == ["alert.opened", "alert.resolved"]


async def test_a_trip_event_tells_the_monitor(parts: tuple[AlertMonitor, SqliteStore, Clock, list[bytes]]) -> None:
    m, store, clock, _ = parts
    trip_event(m, "trip.started", "R-1", clock.ms)
    m.observe(location(clock.ms, speed=60.0), clock.ms)
    await flush(m)
    assert await store.list_alerts("all", None, None, 10) == []
    trip_event(m, "trip.ended", "R-1", clock.ms)
    m.observe(location(clock.ms + 1, speed=60.0), clock.ms + 1)
    await flush(m)
    assert len(await store.list_alerts("open", None, None, 10)) == 1


async def test_silence_waits_while_disconnected_and_after_reconnecting(
    parts: tuple[AlertMonitor, SqliteStore, Clock, list[bytes]],
) -> None:
    m, store, clock, _ = parts
    m.broker(False, 1)
    clock.ms += 3_600_000  # an hour without the broker: every car silent, none told
    await m.check()
    assert m._queue.empty()
    m.broker(True, 2)
    clock.ms += 59_000
    await m.check()
    assert m._queue.empty()
    clock.ms += 2_000
    await m.check()
    await flush(m)
    assert len(await store.list_alerts("open", None, "vehicle_silent", 100)) == len(FLEET.vehicles)


async def test_open_alerts_survive_a_restart(tmp_path: Path) -> None:
    store = open_sqlite(tmp_path / "s.sqlite3")
    clock = Clock()
    events = EventLog(clock=clock)
    m = AlertMonitor(store, FLEET, FleetState(FLEET), events, lambda b: None, Thresholds(), 120, 1.0, clock=clock)
    await m.load()
    m.observe(location(clock.ms, speed=40.0), clock.ms)
    await flush(m)
    await store.close()

    store = open_sqlite(tmp_path / "s.sqlite3")
    again = AlertMonitor(store, FLEET, FleetState(FLEET), events, lambda b: None, Thresholds(), 120, 1.0, clock=clock)
    await again.load()
    again.observe(location(clock.ms + 5, speed=40.0), clock.ms + 5)  # still moving: nothing new
    assert again._queue.empty()
    assert again.open_by_type()["moved_without_trip"] == 1
    again.observe(location(clock.ms + 10), clock.ms + 10)
    await flush(again)
    assert await store.list_alerts("open", None, None, 10) == []
    await store.close()


def trip_event(m: AlertMonitor, type_: str, rid: str, ts: int) -> None:
    m.events.recorded(m.events.new(type_, {"vehicle_id": "ZOE-001", "reservation_id": rid}, ts))  # type: ignore[arg-type]


async def test_a_late_trip_ending_does_not_hide_the_next_one(
    parts: tuple[AlertMonitor, SqliteStore, Clock, list[bytes]],
) -> None:
    m, store, clock, _ = parts
    trip_event(m, "trip.started", "R-1", clock.ms)
    trip_event(m, "trip.started", "R-2", clock.ms + 1)  # R-1 is late back; R-2's renter drives off
    trip_event(m, "trip.ended", "R-1", clock.ms + 2)
    m.observe(location(clock.ms + 3, speed=50.0), clock.ms + 3)
    await flush(m)
    assert await store.list_alerts("all", None, None, 10) == []


async def test_unattended_counts_from_the_end_of_the_trip(
    parts: tuple[AlertMonitor, SqliteStore, Clock, list[bytes]],
) -> None:
    m, store, clock, _ = parts
    trip_event(m, "trip.started", "R-1", clock.ms)
    m.observe(doors(clock.ms, locked=False), clock.ms)  # the renter opens it
    clock.ms += 3_600_000
    trip_event(m, "trip.ended", "R-1", clock.ms)  # ended (forced) with the car unlocked
    await m.check()
    await flush(m)
    assert await store.list_alerts("open", None, "unlocked_unattended", 10) == []  # not for the trip's hour
    clock.ms += 10_000
    await m.check()
    await flush(m)
    [a] = await store.list_alerts("open", None, "unlocked_unattended", 10)
    assert a.type == "unlocked_unattended" and a.details["since_ms"] == clock.ms - 10_000


async def test_a_full_queue_decides_again_later(parts: tuple[AlertMonitor, SqliteStore, Clock, list[bytes]]) -> None:
    m, store, clock, _ = parts
    m._queue = asyncio.Queue(1)
    m.observe(location(clock.ms, speed=40.0), clock.ms)
    m.observe(location(clock.ms, speed=40.0, vid="ZOE-002"), clock.ms)
    assert m.dropped == 1 and m.open_by_type()["moved_without_trip"] == 1
    await flush(m)
    m.observe(location(clock.ms + 1, speed=40.0, vid="ZOE-002"), clock.ms + 1)  # still moving: decided now
    await flush(m)
    assert {a.vehicle_id for a in await store.list_alerts("open", None, None, 10)} == {"ZOE-001", "ZOE-002"}


async def test_an_alert_open_in_the_store_already_is_the_one_followed(
    parts: tuple[AlertMonitor, SqliteStore, Clock, list[bytes]],
) -> None:
    m, store, clock, _ = parts
    theirs = Alert("alr_theirs", "moved_without_trip", "ZOE-001", None, clock.ms - 5, "m")
    assert await store.open_alert(theirs, m.events.new("alert.opened", {}))  # e.g. another instance's
    m.observe(location(clock.ms, speed=40.0), clock.ms)
    await flush(m)
    assert [a.id for a in await store.list_alerts("open", None, None, 10)] == ["alr_theirs"]
    assert [a.id for a in m.open["ZOE-001"].values()] == ["alr_theirs"]  # the monitor follows the stored one
    m.observe(location(clock.ms + 1), clock.ms + 1)  # back home, parked
    await flush(m)
    assert await store.list_alerts("open", None, None, 10) == []


async def test_the_view_of_the_cars_survives_a_restart(tmp_path: Path) -> None:
    store = open_sqlite(tmp_path / "s.sqlite3")
    clock = Clock()
    th = Thresholds(unattended_after_ms=600_000)
    views = tmp_path / "views.json"

    def monitor() -> AlertMonitor:
        return AlertMonitor(
            store, FLEET, FleetState(FLEET), EventLog(clock=clock), lambda b: None, th, 120, 1.0, clock, views
        )

    m = monitor()
    await m.load()
    m.broker(True, 1)
    m.observe(doors(clock.ms, locked=False), clock.ms)
    m.save()
    clock.ms += 300_000
    again = monitor()
    await again.load()  # the saved vehicle state is empty: the view comes from the monitor's own file
    again.broker(True, 1)
    clock.ms += 300_000
    await again.check()
    await flush(again)
    [a] = await store.list_alerts("open", None, "unlocked_unattended", 10)
    assert a.details["since_ms"] == T0  # ten minutes from the first reading, across the restart
    await store.close()


async def test_a_stale_view_gives_way_to_a_newer_vehicle_state(tmp_path: Path) -> None:
    store = open_sqlite(tmp_path / "s.sqlite3")
    clock = Clock()
    th = Thresholds(unattended_after_ms=600_000)
    views = tmp_path / "views.json"
    state = FleetState(FLEET)
    m = AlertMonitor(store, FLEET, state, EventLog(clock=clock), lambda b: None, th, 120, 1.0, clock, views)
    await m.load()
    m.observe(doors(clock.ms, locked=False), clock.ms)
    m.save()
    clock.ms += 86_400_000  # a day with the alerts off: the car was locked meanwhile
    state.update(doors(clock.ms - 1_000, locked=True), clock.ms - 1_000)
    again = AlertMonitor(store, FLEET, state, EventLog(clock=clock), lambda b: None, th, 120, 1.0, clock, views)
    await again.load()
    again.broker(True, 1)
    await again.check()
    assert again._queue.empty() and again.cars["ZOE-001"].locked is True
    await store.close()
