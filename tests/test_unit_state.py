"""Unit tests for gateway.ingest.state: latest readings per car, never moved backwards by a replay."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any, cast

import pytest

from gateway.fleet import Fleet, load_fleet
from gateway.ingest.state import FleetState
from gateway.ingest.state_sync import StateSync
from gateway.ingest.telemetry import Reading
from gateway.store.base import Store
from gateway.times import iso_ms

REPO = Path(__file__).resolve().parent.parent
T0 = 1795683600123  # 2026-11-26T09:00:00.123Z


@pytest.fixture(scope="module")
def fleet() -> Fleet:
    return load_fleet(REPO / "config" / "fleet.yaml")


@pytest.fixture
def state(fleet: Fleet) -> FleetState:
    return FleetState(fleet)


def battery(ts: int, soc: float, vid: str = "ZOE-001", **more: Any) -> Reading:
    return Reading("battery", vid, ts, {"soc_pct": soc, **more})


def test_iso_ms() -> None:
    assert iso_ms(T0) == "2026-11-26T09:00:00.123Z"
    assert iso_ms(T0 - 123) == "2026-11-26T09:00:00.000Z"


def test_empty_view(state: FleetState) -> None:
    assert state.view("ZOE-001") == {
        "vehicle_id": "ZOE-001",
        "model": "zoe",
        "model_name": "Renault Zoé",
        "station": {"id": "alencon-cd61", "town": "Alençon", "lat": 48.4318, "lon": 0.0949},
        "battery": None,
        "location": None,
        "doors": None,
        "online": None,
        "firmware": None,
        "last_seen": None,
    }
    assert state.reporting_count() == 0 and state.online_count() == 0


def test_newer_reading_replaces(state: FleetState) -> None:
    state.update(battery(T0, 50), T0)
    state.update(battery(T0 + 1000, 60), T0 + 1000)
    assert state.view("ZOE-001")["battery"] == {"soc_pct": 60, "ts": "2026-11-26T09:00:01.123Z"}


def test_older_reading_never_replaces_newer(state: FleetState) -> None:
    state.update(battery(T0, 80, range_km=200.0), T0)
    # the car replays what it buffered offline an hour earlier
    state.update(battery(T0 - 3_600_000, 20), T0 + 5000)
    v = state.view("ZOE-001")
    assert v["battery"] == {"soc_pct": 80, "range_km": 200.0, "ts": "2026-11-26T09:00:00.123Z"}
    # but the car was heard from: last_seen is the receive time
    assert v["last_seen"] == iso_ms(T0 + 5000)


def test_older_by_one_ms_does_not_replace(state: FleetState) -> None:
    state.update(battery(T0, 80), T0)
    state.update(battery(T0 - 1, 10), T0)
    assert state.vehicles["ZOE-001"].readings["battery"].fields["soc_pct"] == 80


def test_same_timestamp_replaces(state: FleetState) -> None:
    state.update(battery(T0, 80), T0)
    state.update(battery(T0, 81), T0)
    assert state.vehicles["ZOE-001"].readings["battery"].fields["soc_pct"] == 81


def test_kinds_are_independent(state: FleetState) -> None:
    state.update(Reading("location", "ZOE-001", T0 + 10_000, {"lat": 48.4, "lon": 0.09}), T0)
    state.update(battery(T0, 50), T0)  # older than the location, but a different kind
    state.update(Reading("doors", "ZOE-001", T0 - 5000, {"locked": True, "closed": False}), T0)
    v = state.view("ZOE-001")
    assert v["battery"]["soc_pct"] == 50
    assert v["location"] == {"lat": 48.4, "lon": 0.09, "ts": iso_ms(T0 + 10_000)}
    assert v["doors"] == {"locked": True, "closed": False, "ts": iso_ms(T0 - 5000)}


def test_vehicles_are_independent(state: FleetState) -> None:
    state.update(battery(T0, 50, "ZOE-001"), T0)
    state.update(battery(T0 - 1000, 40, "KANGOO-001"), T0)
    assert state.view("KANGOO-001")["battery"]["soc_pct"] == 40
    assert state.view("KANGOO-001")["model_name"] == "Renault Kangoo Z.E."
    assert state.view("ZOE-002")["battery"] is None
    assert state.reporting_count() == 2


def test_status_online_and_firmware(state: FleetState) -> None:
    state.update(Reading("status", "ZOE-001", T0, {"online": True, "firmware": "2.4.1"}), T0)
    state.update(Reading("status", "ZOE-002", T0, {"online": True}), T0)
    state.update(Reading("status", "ZOE-003", T0, {"online": False}), T0)
    assert state.online_count() == 2
    v = state.view("ZOE-001")
    assert v["online"] is True and v["firmware"] == "2.4.1"
    assert state.view("ZOE-002")["firmware"] is None
    assert state.view("ZOE-003")["online"] is False
    # the will message arrives later: offline
    state.update(Reading("status", "ZOE-001", T0 + 1, {"online": False}), T0 + 1)
    assert state.online_count() == 1
    assert state.view("ZOE-001")["online"] is False


def test_stale_offline_will_does_not_override_newer_online(state: FleetState) -> None:
    state.update(Reading("status", "ZOE-001", T0, {"online": True}), T0)
    state.update(Reading("status", "ZOE-001", T0 - 60_000, {"online": False}), T0 + 10)
    assert state.online_count() == 1


def test_view_does_not_expose_internal_dicts(state: FleetState) -> None:
    state.update(battery(T0, 50), T0)
    v = state.view("ZOE-001")
    v["battery"]["soc_pct"] = 0
    assert state.vehicles["ZOE-001"].readings["battery"].fields["soc_pct"] == 50


def test_every_registry_vehicle_has_a_state(fleet: Fleet, state: FleetState) -> None:
    assert set(state.vehicles) == set(fleet.vehicles)
    big = FleetState(fleet.with_generated(300))
    assert len(big.vehicles) == 300
    assert big.view("SIM-00300")["model"] in fleet.models


def test_saved_state_is_restored_after_a_restart(state: FleetState, fleet: Fleet, tmp_path: Path) -> None:
    state.update(battery(T0, 64.5, charging=True), T0 + 40)
    state.update(Reading("location", "ZOE-001", T0, {"lat": 48.43, "lon": 0.09}), T0 + 40)
    state.update(Reading("status", "KANGOO-001", T0, {"online": True, "firmware": "2.1"}), T0 + 50)
    path = tmp_path / "vehicles.json"
    state.save(path)

    restored = FleetState(fleet)
    restored.load(path)
    assert restored.view("ZOE-001") == state.view("ZOE-001")
    assert restored.view("KANGOO-001")["online"] is True
    assert restored.view("ZOE-002")["last_seen"] is None
    # a restored reading still loses against a newer one and wins against an older one
    restored.update(battery(T0 - 1, 10.0), T0 + 60)
    assert restored.view("ZOE-001")["battery"]["soc_pct"] == 64.5


def test_a_missing_or_damaged_state_file_starts_empty(fleet: Fleet, tmp_path: Path) -> None:
    s = FleetState(fleet)
    s.load(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text('{"ZOE-001": {"readings": 5}}')
    s.load(tmp_path / "bad.json")
    (tmp_path / "worse.json").write_text("{not json")
    s.load(tmp_path / "worse.json")
    assert s.reporting_count() == 0


class SlowStore:
    """Only what StateSync calls; reading the others' changes takes `read_s` (a store slow under load)."""

    def __init__(self, read_s: float) -> None:
        self.read_s = read_s
        self.turns: list[tuple[float, float]] = []  # each turn's start and end, on the loop's clock

    async def put_states(self, readings: Any, seen: Any) -> int:
        return 0

    async def states_changed_since(self, cursor: int, own: int = 0) -> tuple[list[Any], dict[str, int], int]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.sleep(self.read_s)
        self.turns.append((start, loop.time()))
        return [], {}, cursor


async def turns_within(
    state: FleetState, read_s: float, seconds: float, every_s: float = 0.1
) -> list[tuple[float, float]]:
    store = SlowStore(read_s)
    task = asyncio.create_task(StateSync(state, cast(Store, store), every_s).run())
    await asyncio.sleep(seconds)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return store.turns


async def test_state_sync_keeps_its_beat_when_turns_are_slow(state: FleetState) -> None:
    # Every turn takes 60 % of the period. Sleeping a whole period after each turn would put turns 1.6
    # periods apart (13 in 20 periods), and a reading's way to the other gateways beyond two periods.
    # Two seconds, so that a stall of the machine of up to 0.4 s is not read as a lost beat.
    turns = await turns_within(state, read_s=0.06, seconds=2.0)
    assert len(turns) >= 16, turns  # 20 on the beat (turns at 0, 0.1, ... 1.9 s), at most 13 without


async def test_state_sync_overrunning_its_period_still_leaves_a_gap(state: FleetState) -> None:
    # Each turn takes 1.5 periods: back to back, a slow store would get the next turn at once, from
    # every gateway. Half a period (0.05 s) between the end of a turn and the next, then.
    turns = await turns_within(state, read_s=0.15, seconds=1.0)
    gaps = [nxt[0] - end for (_, end), nxt in itertools.pairwise(turns)]
    assert len(gaps) >= 3 and min(gaps) >= 0.045, gaps
