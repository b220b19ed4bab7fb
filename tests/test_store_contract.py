"""The Store contract: every backend passes these tests unchanged.

The ``store`` fixture yields each backend in turn: SQLite, and PostgreSQL
(a private server for the run, a fresh database per test: ``tests/pg.py``).
A test here says only what the protocol in ``gateway/store/base.py``
promises, never how a backend keeps it. SQLite's own promises (migrations,
a corrupt file) are in ``tests/test_store_sqlite.py``; PostgreSQL's, with
its real races between two stores, in ``tests/test_store_postgres.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.errors import StaleRead, StoreError
from gateway.fleet import load_fleet
from gateway.rules.alerts import Alert, AlertType
from gateway.rules.commands import CommandRecord, Outcome
from gateway.rules.events import Event, EventType, make_event, ulid_floor
from gateway.rules.priority import Plan, Refusal
from gateway.rules.reservations import Kind, Reservation, StartUnlock
from gateway.rules.trips import Trip
from gateway.rules.usage import UsageRows
from gateway.rules.webhooks import Attempt
from gateway.store.base import AUDIT_RETENTION_MS, IDEMPOTENCY_RETENTION_MS, Room, Store, StoredReading
from gateway.store.postgres import open_postgres
from gateway.store.sqlite import open_sqlite
from tests.helpers import REPO
from tests.pg import Postgres, postgres

__all__ = ["postgres"]  # the session fixture, used here by name

FLEET = load_fleet(REPO / "config" / "fleet.yaml")
H = 3_600_000
T0 = 1_795_680_000_000  # 2026-11-26T05:20:00Z


def res(rid: str, vehicle: str = "ZOE-001", start_h: float = 1, end_h: float = 2, **kw: object) -> Reservation:
    fields: dict[str, object] = {
        "id": rid,
        "vehicle_id": vehicle,
        "user_id": "U-1",
        "starts_ms": int(T0 + start_h * H),
        "ends_ms": int(T0 + end_h * H),
        "kind": "public",
        "unlock_at_start": False,
        "created_ms": T0,
        "updated_ms": T0,
    }
    fields.update(kw)
    return Reservation(**fields)  # type: ignore[arg-type]


def rec(cid: str, vehicle: str = "ZOE-001", issued: int = T0, **kw: object) -> CommandRecord:
    fields: dict[str, object] = {
        "command_id": cid,
        "vehicle_id": vehicle,
        "action": "unlock",
        "reservation_id": "R-1",
        "caller": "booking",
        "source": "api",
        "issued_ms": issued,
        "result": "done",
        "reason": None,
        "latency_ms": 12.5,
    }
    fields.update(kw)
    return CommandRecord(**fields)  # type: ignore[arg-type]


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        s: Store = open_sqlite(tmp_path / "store.sqlite3")
        yield s
        await s.close()
        return
    pg: Postgres = request.getfixturevalue("postgres")
    s = await open_postgres(await pg.fresh(), pool_size=4)
    yield s
    await s.close()
    pg.drop_all()


async def test_a_reservation_round_trips(store: Store) -> None:
    r = res("R-1", start_unlock=StartUnlock("done", T0, "c-1", None), created_by="booking")
    assert await store.put_reservation(r, T0) is None
    assert await store.get_reservation("R-1") == r
    assert await store.get_reservation("R-2") is None


async def test_put_refuses_an_overlap_and_returns_the_one_in_the_way(store: Store) -> None:
    assert await store.put_reservation(res("R-1", start_h=1, end_h=3), T0) is None
    clash = await store.put_reservation(res("R-2", start_h=2, end_h=4), T0)
    assert clash is not None and clash.id == "R-1"
    assert await store.get_reservation("R-2") is None
    assert await store.put_reservation(res("R-3", start_h=3, end_h=4), T0) is None  # back to back
    assert await store.put_reservation(res("R-4", vehicle="ZOE-002", start_h=1, end_h=3), T0) is None
    assert await store.put_reservation(res("R-1", start_h=0, end_h=2), T0) is None  # moving itself is fine


async def test_cancelled_and_ended_reservations_block_nothing(store: Store) -> None:
    assert await store.put_reservation(res("R-1", start_h=1, end_h=3), T0) is None
    assert await store.cancel_reservation("R-1", T0)
    assert not await store.cancel_reservation("R-1", T0)  # already
    assert not await store.cancel_reservation("R-nope", T0)
    assert await store.put_reservation(res("R-2", start_h=1, end_h=3), T0) is None
    # R-2 has ended by T0 + 4 h: a new one over its span is allowed then.
    assert await store.put_reservation(res("R-3", start_h=2, end_h=5), T0 + 4 * H) is None
    got = await store.get_reservation("R-1")
    assert got is not None and got.cancelled


async def test_two_puts_racing_for_one_slot_cannot_both_win(store: Store) -> None:
    # SQLite's calls run one after another on the loop; a networked backend's suspend, and race for real.
    results = await asyncio.gather(*(store.put_reservation(res(f"R-{i}"), T0) for i in range(8)))
    assert sum(r is None for r in results) == 1


async def test_listing_filters_and_orders(store: Store) -> None:
    for r in (res("R-b", start_h=2, end_h=3), res("R-a", start_h=1, end_h=2), res("R-c", "ZOE-002", 5, 6)):
        assert await store.put_reservation(r, T0) is None
    ids = [r.id for r in await store.list_reservations(None, None, None, 10)]
    assert ids == ["R-a", "R-b", "R-c"]
    assert [r.id for r in await store.list_reservations("ZOE-002", None, None, 10)] == ["R-c"]
    overlapping = await store.list_reservations(None, T0 + 2 * H, T0 + 5 * H, 10)
    assert [r.id for r in overlapping] == ["R-b"]  # R-a ends at 2 h; R-c starts at 5 h
    assert len(await store.list_reservations(None, None, None, 2)) == 2


async def test_start_unlocks_are_claimed_once(store: Store) -> None:
    due = res("R-due", start_h=-0.1, end_h=1, unlock_at_start=True)
    later = res("R-later", "ZOE-002", start_h=1, end_h=2, unlock_at_start=True)
    plain = res("R-plain", "ZOE-003", start_h=-0.1, end_h=1)
    for r in (due, later, plain):
        assert await store.put_reservation(r, T0) is None
    assert [r.id for r in await store.due_start_unlocks(T0)] == ["R-due"]
    assert await store.next_start_unlock_ms(T0) == due.starts_ms
    claim = StartUnlock("pending", T0)
    assert await store.claim_start_unlock("R-due", claim)
    assert not await store.claim_start_unlock("R-due", claim)
    assert await store.due_start_unlocks(T0) == []
    assert [r.id for r in await store.pending_start_unlocks()] == ["R-due"]
    assert await store.next_start_unlock_ms(T0) == later.starts_ms
    done = StartUnlock("done", T0 + 5, "c-9", None)
    await store.set_start_unlock("R-due", done)
    assert await store.pending_start_unlocks() == []
    got = await store.get_reservation("R-due")
    assert got is not None and got.start_unlock == done
    await store.set_start_unlock("R-due", None)  # released: due again
    assert [r.id for r in await store.due_start_unlocks(T0)] == ["R-due"]


async def test_a_cancelled_or_ended_reservation_is_never_due(store: Store) -> None:
    assert await store.put_reservation(res("R-1", start_h=-0.1, end_h=1, unlock_at_start=True), T0) is None
    assert await store.cancel_reservation("R-1", T0)
    assert await store.due_start_unlocks(T0) == []
    assert await store.put_reservation(res("R-2", "ZOE-002", start_h=-2, end_h=-1, unlock_at_start=True), T0) is None
    assert await store.due_start_unlocks(T0) == [] and await store.next_start_unlock_ms(T0) is None


async def test_idempotent_outcomes_are_kept_per_caller(store: Store) -> None:
    o = Outcome("c-1", "ZOE-001", "unlock", "rejected", "expired", 12.5, None, T0)
    await store.save_idempotent_outcome("alice", "k", "fp-1", o, T0)
    # A saved outcome is what a later claim of the key gets back, whatever the claimant.
    assert await store.claim_idempotency_key("alice", "k", "fp-2", "h", T0) == ("fp-1", o)
    assert await store.claim_idempotency_key("bob", "k", "fp-1", "h", T0) == "claimed"
    assert await store.claim_idempotency_key("alice", "other", "fp-1", "h", T0) == "claimed"


async def test_the_audit_lists_newest_first_within_a_window(store: Store) -> None:
    for i in range(5):
        await store.record_command(rec(f"c-{i}", issued=T0 + i * 1000))
    await store.record_command(rec("c-other", "ZOE-002", issued=T0))
    await store.record_command(
        rec("c-x", issued=T0 + 10, result="broker_unavailable", reason="broker_unavailable", latency_ms=None)
    )
    got = await store.list_commands("ZOE-001", None, None, 10)
    assert [c.command_id for c in got] == ["c-4", "c-3", "c-2", "c-1", "c-x", "c-0"]
    assert got[-2].latency_ms is None and got[-2].result == "broker_unavailable"
    window = await store.list_commands("ZOE-001", T0 + 1000, T0 + 3000, 10)
    assert [c.command_id for c in window] == ["c-2", "c-1"]  # from inclusive, to exclusive
    assert len(await store.list_commands("ZOE-001", None, None, 2)) == 2
    assert await store.list_commands("ZOE-003", None, None, 10) == []
    assert got[0] == rec("c-4", issued=T0 + 4000)


async def test_prune_keeps_the_audit_400_days_and_keys_a_day(store: Store) -> None:
    now = T0 + 500 * 86_400_000
    await store.record_command(rec("old", issued=now - AUDIT_RETENTION_MS - 1))
    await store.record_command(rec("kept", issued=now - 400 * 86_400_000))
    o = Outcome("c-1", "ZOE-001", "unlock", "done", None, 1.0)
    await store.save_idempotent_outcome("a", "old", "fp", o, now - IDEMPOTENCY_RETENTION_MS - 1)
    await store.save_idempotent_outcome("a", "new", "fp", o, now - 1000)
    assert await store.prune(now) == 2
    assert [c.command_id for c in await store.list_commands("ZOE-001", None, None, 10)] == ["kept"]
    assert await store.claim_idempotency_key("a", "old", "fp", "h", now) == "claimed"
    assert await store.claim_idempotency_key("a", "new", "fp", "h", now) == ("fp", o)


# ---- trips -----------------------------------------------------------------------------------------


def trip(
    rid: str,
    vehicle: str = "ZOE-001",
    user: str = "U-1",
    kind: Kind = "public",
    start_h: float = 0,
    station: str = "alencon-cd61",
) -> Trip:
    return Trip(
        rid,
        vehicle,
        user,
        kind,
        station,
        T0,
        T0 + H,
        int(T0 + start_h * H),
        100.0,
        80.0,
    )


def ended(t: Trip, minutes: float = 50, amount: int = 150) -> Trip:
    return replace(
        t, ended_ms=t.started_ms + int(minutes * 60_000), ended_by="user", end_odometer_km=110.0, end_soc_pct=70.0,
        end_at_station=True, distance_km=10.0, energy_kwh=5.2, duration_min=minutes, late_min=0.0, billed_min=60,
        amount_cents=amount,
    )  # fmt: skip


async def test_a_trip_starts_once_and_ends_once_completing_its_reservation(store: Store) -> None:
    assert await store.put_reservation(res("R-1", start_h=0, end_h=1), T0) is None
    t = trip("R-1")
    assert await store.start_trip(t)
    assert not await store.start_trip(replace(t, started_ms=T0 + 5))  # the first unlock started it
    assert await store.get_trip("R-1") == t
    assert [x.reservation_id for x in await store.running_trips(T0 + 2 * H)] == ["R-1"]
    assert await store.running_trips(T0 + H) == []  # booked end not yet before that
    done = ended(t)
    assert await store.end_trip(done, "2026-11")
    assert not await store.end_trip(replace(done, ended_ms=T0 + 2 * H), "2026-11")  # ending twice changes nothing
    assert await store.get_trip("R-1") == done and await store.running_trips(T0 + 9 * H) == []
    r = await store.get_reservation("R-1")
    assert r is not None and r.completed and not r.live(T0)
    # A completed reservation no longer holds its slot.
    assert await store.put_reservation(res("R-2", start_h=0.5, end_h=1), T0) is None


async def test_trips_are_listed_by_start_and_filtered(store: Store) -> None:
    for t in (trip("R-b", start_h=2), trip("R-a", "ZOE-002", "U-2", start_h=1), trip("R-c", start_h=3, user="U-2")):
        assert await store.start_trip(t)
    assert [t.reservation_id for t in await store.list_trips(None, None, None, None, 10)] == ["R-a", "R-b", "R-c"]
    assert [t.reservation_id for t in await store.list_trips(T0 + 2 * H, None, None, None, 10)] == ["R-b", "R-c"]
    assert [t.reservation_id for t in await store.list_trips(None, T0 + 2 * H, None, None, 10)] == ["R-a"]
    assert [t.reservation_id for t in await store.list_trips(None, None, "ZOE-001", "U-2", 10)] == ["R-c"]
    assert len(await store.list_trips(None, None, None, None, 2)) == 2


async def test_usage_sums_the_ended_trips_of_a_month(store: Store) -> None:
    trips = [
        ended(trip("R-1", start_h=1), amount=150),
        ended(trip("R-2", start_h=2, station="belleme"), amount=188),
        ended(trip("R-3", user="U-2", kind="staff", start_h=3), amount=0),
        ended(trip("R-4", start_h=30)),  # another month
        trip("R-5", start_h=4),  # still running: not billed yet
    ]
    for t in trips:
        assert await store.start_trip(replace(t, ended_ms=None) if t.ended_ms else t)
        if t.ended_ms:
            assert await store.end_trip(t, "2026-12" if t.reservation_id == "R-4" else "2026-11")
    rows = await store.usage("2026-11")
    users = {u.user_id: u for u in rows.users}
    assert set(users) == {"U-1", "U-2"}
    assert (users["U-1"].trips, users["U-1"].amount_cents, users["U-1"].public_trips) == (2, 338, 2)
    assert users["U-1"].first_public_station == "alencon-cd61" and users["U-1"].billed_min == 120
    assert (users["U-2"].public_trips, users["U-2"].first_public_station) == (0, None)
    groups = {(g.vehicle_id, g.station, g.kind): g for g in rows.vehicles}
    assert set(groups) == {("ZOE-001", "alencon-cd61", "public"), ("ZOE-001", "belleme", "public"),
                           ("ZOE-001", "alencon-cd61", "staff")}  # fmt: skip
    g = groups[("ZOE-001", "alencon-cd61", "public")]
    assert (g.trips, g.duration_min, g.distance_km, g.energy_kwh, g.amount_cents) == (1, 50.0, 10.0, 5.2, 150)
    assert (await store.usage("2026-12")).users[0].trips == 1 and await store.usage("2027-01") == UsageRows([], [])


# -- events, the webhook outbox and alerts ------------------------------------------------------------------

A, B = "http://a.example/hook", "http://b.example/hook"


def event(n: int, type_: EventType = "alert.opened", targets: tuple[str, ...] = (A,), ts: int = T0) -> Event:
    """The n-th event, recorded at `ts` + n ms, with the id the event log would give it."""
    return make_event("evt_" + ulid_floor(ts + n), type_, ts + n, {"n": n}, targets)


async def test_events_are_listed_after_an_id_oldest_first_and_by_type(store: Store) -> None:
    for n in range(5):
        await store.add_event(event(n, "trip.started" if n % 2 else "alert.opened"))
    assert [e.id for e in await store.list_events(None, None, 10)] == [event(n).id for n in range(5)]
    assert [e.id for e in await store.list_events(event(2).id, None, 10)] == [event(3).id, event(4).id]
    assert [e.id for e in await store.list_events(None, "trip.started", 10)] == [event(1).id, event(3).id]
    never = event(1).id[:-1] + "Z"  # after event 1, before event 2: never recorded (or pruned)
    assert [e.id for e in await store.list_events(never, None, 2)] == [event(2).id, event(3).id]
    [got] = await store.list_events(event(3).id, "alert.opened", 10)
    assert got.body == event(4).body and got.ts_ms == T0 + 4 and got.type == "alert.opened"


async def test_an_event_queues_one_delivery_per_target(store: Store) -> None:
    await store.add_event(event(1, targets=(A, B)))
    await store.add_event(event(2, targets=()))
    assert await store.webhook_backlog() == 2
    [d] = await store.due_deliveries(A, T0 + 10, 10)
    assert (d.event_id, d.endpoint, d.attempts, d.event_ms, d.body) == (event(1).id, A, 0, T0 + 1, event(1).body)
    assert await store.due_deliveries(A, T0, 10) == []  # recorded at T0 + 1: due from then
    assert await store.next_delivery_ms(A, T0) == T0 + 1 and await store.next_delivery_ms("http://c/", T0) is None
    assert await store.next_delivery_ms(A, T0 + 1) is None  # only what is due after the given time


async def test_a_delivery_is_retried_then_finished(store: Store) -> None:
    await store.add_event(event(1, targets=(A, B)))
    await store.add_event(event(2, targets=(A,)))
    [d, d2] = await store.due_deliveries(A, T0 + 10, 10)
    await store.record_attempts([Attempt(d.event_id, A, 1, "pending", T0 + 5_000, T0 + 10, "HTTP 500"),
                                 Attempt(d2.event_id, A, 1, "delivered", d2.due_ms, T0 + 10)])  # fmt: skip
    assert await store.due_deliveries(A, T0 + 4_999, 10) == []
    [again] = await store.due_deliveries(A, T0 + 5_000, 10)
    assert again.attempts == 1 and await store.next_delivery_ms(A, T0 + 10) == T0 + 5_000
    await store.record_attempts([Attempt(again.event_id, A, 2, "delivered", again.due_ms, T0 + 5_001)])
    assert await store.due_deliveries(A, T0 + H, 10) == [] and await store.next_delivery_ms(A, T0) is None
    # Finished once: a late outcome changes nothing.
    await store.record_attempts([Attempt(again.event_id, A, 3, "pending", T0 + 9_000, T0 + 5_002, "late")])
    assert await store.due_deliveries(A, T0 + H, 10) == []
    assert await store.webhook_backlog() == 1  # B still owed
    assert await store.give_up_deliveries(None, [A], "dropped", T0, "not configured") == 1
    assert await store.webhook_backlog() == 0


async def test_an_endpoint_gone_gives_up_what_it_is_owed(store: Store) -> None:
    for n in range(3):
        await store.add_event(event(n, targets=(A, B)))
    assert await store.give_up_deliveries(A, (), "gone", T0, "410") == 3
    assert await store.due_deliveries(A, T0 + H, 10) == [] and len(await store.due_deliveries(B, T0 + H, 10)) == 3


async def test_recording_a_command_records_its_event(store: Store) -> None:
    e = event(1, "command.completed")
    await store.record_command(rec("c-1"), e)
    [got] = await store.list_events(None, "command.completed", 10)
    assert got.id == e.id and [d.event_id for d in await store.due_deliveries(A, T0 + 10, 10)] == [e.id]
    assert [c.command_id for c in await store.list_commands("ZOE-001", None, None, 10)] == ["c-1"]


async def test_a_trip_event_is_recorded_only_with_its_change(store: Store) -> None:
    assert await store.put_reservation(res("R-1", start_h=0, end_h=1), T0) is None
    t = trip("R-1")
    assert await store.start_trip(t, event(1, "trip.started"))
    assert not await store.start_trip(t, event(2, "trip.started"))  # started already: no second event
    assert await store.end_trip(ended(t), "2026-11", event(3, "trip.ended"))
    assert not await store.end_trip(ended(t), "2026-11", event(4, "trip.ended"))
    assert [e.id for e in await store.list_events(None, None, 10)] == [event(1).id, event(3).id]


def alert(aid: str, type_: AlertType = "moved_without_trip", vehicle: str = "ZOE-001", rid: str | None = None,
          opened: int = T0) -> Alert:  # fmt: skip
    return Alert(aid, type_, vehicle, rid, opened, f"{type_} of {vehicle}", {"speed_kmh": 42.0, "nested": [1, "x"]})


async def test_one_open_alert_per_type_car_and_reservation(store: Store) -> None:
    a = alert("alr_1")
    assert await store.open_alert(a, event(1))
    assert not await store.open_alert(alert("alr_2"), event(2))  # the same key open already: nothing recorded
    assert await store.open_alert(alert("alr_3", vehicle="ZOE-002"), event(3))
    assert await store.open_alert(alert("alr_4", "low_battery_before_reservation", rid="R-1"), event(4))
    assert await store.open_alert(alert("alr_5", "low_battery_before_reservation", rid="R-2"), event(5))
    assert [e.id for e in await store.list_events(None, None, 10)] == [event(n).id for n in (1, 3, 4, 5)]
    assert await store.list_alerts("open", "ZOE-001", "moved_without_trip", 10) == [a]
    assert await store.resolve_alert(a, T0 + 10, event(6, "alert.resolved"))
    assert not await store.resolve_alert(a, T0 + 20, event(7, "alert.resolved"))
    [done] = await store.list_alerts("resolved", None, None, 10)
    assert done == replace(a, resolved_ms=T0 + 10)
    assert await store.open_alert(alert("alr_8"), event(8))  # resolved: the same key may open again


async def test_alerts_are_listed_newest_first_and_filtered(store: Store) -> None:
    for i, (vehicle, type_) in enumerate([("ZOE-001", "moved_without_trip"), ("ZOE-002", "vehicle_silent"),
                                          ("ZOE-001", "vehicle_silent")]):  # fmt: skip
        t: AlertType = "moved_without_trip" if type_ == "moved_without_trip" else "vehicle_silent"
        assert await store.open_alert(alert(f"alr_{i}", t, vehicle, opened=T0 + i), event(i))
    await store.resolve_alert(alert("alr_0"), T0 + 9, event(9))
    assert [a.id for a in await store.list_alerts("all", None, None, 10)] == ["alr_2", "alr_1", "alr_0"]
    assert [a.id for a in await store.list_alerts("open", None, None, 10)] == ["alr_2", "alr_1"]
    assert [a.id for a in await store.list_alerts("all", "ZOE-001", None, 10)] == ["alr_2", "alr_0"]
    assert [a.id for a in await store.list_alerts("all", None, "vehicle_silent", 1)] == ["alr_2"]


async def test_prune_forgets_old_events_and_their_deliveries(store: Store) -> None:
    await store.add_event(event(1, ts=T0))
    await store.add_event(event(2, ts=T0 + H))
    assert await store.prune(T0 + H, T0 + H) >= 1
    assert [e.id for e in await store.list_events(None, None, 10)] == [event(2, ts=T0 + H).id]
    assert await store.webhook_backlog() == 1


# -- staff priority ----------------------------------------------------------------------------------------


def room(*candidates: str, notice_h: float = 24) -> Room:
    return Room(candidates, int(notice_h * H), lambda plan: [event(i, "reservation.reassigned") for i, _ in
                                                             enumerate(plan.moves)])  # fmt: skip


async def test_a_staff_reservation_moves_cancels_or_changes_nothing(store: Store) -> None:
    assert await store.put_reservation(res("P-1", start_h=30, end_h=32), T0) is None
    assert await store.put_reservation(res("P-2", start_h=40, end_h=42), T0) is None
    assert await store.put_reservation(res("X", "ZOE-002", start_h=39, end_h=43), T0) is None
    plan = await store.put_with_priority(res("S-1", start_h=29, end_h=45, kind="staff"), T0, room("ZOE-002"))
    assert isinstance(plan, Plan) and [(m.reservation_id, m.action, m.vehicle_id) for m in plan.moves] == [
        ("P-1", "reassigned", "ZOE-002"), ("P-2", "cancelled", "ZOE-001"),
    ]  # fmt: skip
    moved, gone = await store.get_reservation("P-1"), await store.get_reservation("P-2")
    assert moved is not None and moved.vehicle_id == "ZOE-002" and not moved.cancelled
    assert gone is not None and gone.cancelled and gone.cancel_reason == "preempted_by_staff"
    assert await store.get_reservation("S-1") is not None
    assert len(await store.list_events(None, "reservation.reassigned", 10)) == 2


async def test_a_refused_staff_reservation_changes_nothing(store: Store) -> None:
    assert await store.put_reservation(res("P-1", start_h=1, end_h=3), T0) is None
    refused = await store.put_with_priority(res("S-1", start_h=0.5, end_h=4, kind="staff"), T0, room())
    assert isinstance(refused, Refusal) and refused.blocking.id == "P-1"
    assert await store.get_reservation("S-1") is None and await store.list_events(None, None, 10) == []
    got = await store.get_reservation("P-1")
    assert got is not None and got.vehicle_id == "ZOE-001" and not got.cancelled


async def test_a_reservation_whose_trip_has_started_is_never_displaced(store: Store) -> None:
    assert await store.put_reservation(res("P-1", start_h=30, end_h=32), T0) is None
    assert await store.start_trip(replace(trip("P-1"), booked_start_ms=T0 + 30 * H, booked_end_ms=T0 + 32 * H))
    refused = await store.put_with_priority(res("S-1", start_h=29, end_h=33, kind="staff"), T0, room("ZOE-002"))
    assert isinstance(refused, Refusal) and "started" in refused.why


async def test_a_cancelled_reservation_says_why(store: Store) -> None:
    assert await store.put_reservation(res("P-1"), T0) is None
    assert await store.cancel_reservation("P-1", T0)
    got = await store.get_reservation("P-1")
    assert got is not None and got.cancel_reason == "cancelled"


async def test_a_staff_reservation_moving_car_frees_the_one_it_leaves(store: Store) -> None:
    assert await store.put_reservation(res("X", "ZOE-001", start_h=0, end_h=9), T0) is None
    assert await store.put_with_priority(res("S-1", "ZOE-002", start_h=1, end_h=5, kind="staff"), T0, room()) == Plan()
    assert await store.put_reservation(res("P-3", "ZOE-003", start_h=2, end_h=3), T0) is None
    # S-1 moves from ZOE-002 to ZOE-003: P-3 (within the notice) can go to the ZOE-002 that S-1 leaves.
    plan = await store.put_with_priority(
        res("S-1", "ZOE-003", start_h=1, end_h=5, kind="staff"), T0, room("ZOE-001", "ZOE-002", notice_h=48)
    )
    assert isinstance(plan, Plan) and [(m.reservation_id, m.action, m.vehicle_id) for m in plan.moves] == [
        ("P-3", "reassigned", "ZOE-002")
    ]


async def test_a_plan_that_fails_half_way_changes_nothing(store: Store) -> None:
    assert await store.put_reservation(res("P-1", start_h=30, end_h=32), T0) is None

    def explode(plan: Plan) -> list[Event]:
        raise StoreError("the disk is full")

    with pytest.raises(StoreError):
        await store.put_with_priority(
            res("S-1", start_h=29, end_h=33, kind="staff"), T0, Room(("ZOE-002",), H, explode)
        )
    got = await store.get_reservation("P-1")
    assert got is not None and got.vehicle_id == "ZOE-001" and await store.get_reservation("S-1") is None


async def test_deliveries_too_old_are_given_up_in_one_go(store: Store) -> None:
    for n in range(5):
        await store.add_event(event(n, targets=(A, B), ts=T0))
    await store.add_event(event(0, targets=(A,), ts=T0 + H))
    assert await store.expire_deliveries(A, T0 + H, T0 + 2 * H) == 5
    assert [d.event_id for d in await store.due_deliveries(A, T0 + 3 * H, 10)] == [event(0, ts=T0 + H).id]
    assert len(await store.due_deliveries(B, T0 + 3 * H, 10)) == 5  # another endpoint's are its own


# -- a write based on a read: checked against what is stored when it commits --


async def test_a_put_based_on_a_stale_read_writes_nothing(store: Store) -> None:
    r = res("R-1")
    with pytest.raises(StaleRead):
        await store.put_reservation(r, T0, expected=res("R-1"))  # it was read as there; it is not
    assert await store.get_reservation("R-1") is None
    assert await store.put_reservation(r, T0, expected=None) is None  # read as absent, still absent
    read = await store.get_reservation("R-1")
    assert await store.cancel_reservation("R-1", T0 + 1)  # someone else, between our read and our write
    moved = replace(r, ends_ms=r.ends_ms + H)
    with pytest.raises(StaleRead):
        await store.put_reservation(moved, T0 + 2, expected=read)
    with pytest.raises(StaleRead):
        await store.put_with_priority(replace(moved, kind="staff"), T0 + 2, room(), expected=read)
    after = await store.get_reservation("R-1")
    assert after is not None and after.cancelled and after.ends_ms == r.ends_ms  # the cancel stands
    assert await store.put_reservation(moved, T0 + 3, expected=after) is None  # read again: written


async def test_booking_reads_again_when_the_reservation_changes_under_its_put(store: Store) -> None:
    # Between Booking.put's read and its write the reservation is cancelled (another request, or another
    # gateway on PostgreSQL): the write must not bring it back; the PUT reads again and says it is cancelled.
    from gateway.booking.service import Booking
    from gateway.errors import ReservationCancelled
    from gateway.rules.reservations import ReservationRequest

    fleet = load_fleet(REPO / "config" / "fleet.yaml")
    now = T0
    booking = Booking(store, fleet, None, lambda line: None, early_grace_s=900, clock=lambda: now)  # type: ignore[arg-type]
    request = ReservationRequest("ZOE-001", "U-1", T0 + H, T0 + 2 * H, "public", False)
    await booking.put("R-1", request, "test")
    real_get = store.get_reservation

    async def get_then_cancelled(rid: str) -> Reservation | None:
        seen = await real_get(rid)
        if seen is not None and not seen.cancelled:
            await store.cancel_reservation(rid, now)
        return seen

    store.get_reservation = get_then_cancelled  # type: ignore[method-assign,assignment]
    later = ReservationRequest("ZOE-001", "U-1", T0 + H, T0 + 3 * H, "public", False)
    with pytest.raises(ReservationCancelled):
        await booking.put("R-1", later, "test")
    store.get_reservation = real_get  # type: ignore[method-assign]
    stored = await store.get_reservation("R-1")
    assert stored is not None and stored.cancelled and stored.ends_ms == T0 + 2 * H


# ---- several gateways, one fleet: leases, the shared vehicle state, claimed idempotency keys -------------


async def test_a_lease_has_one_holder_until_it_expires_or_is_released(store: Store) -> None:
    assert await store.take_lease("once", "gw1", T0, 1000)
    assert not await store.take_lease("once", "gw2", T0 + 1, 1000)
    assert await store.take_lease("once", "gw1", T0 + 500, 1000)  # renewed: now until T0 + 1500
    assert not await store.take_lease("once", "gw2", T0 + 1000, 1000)
    assert await store.take_lease("other", "gw2", T0, 1000)  # leases are by name
    assert await store.take_lease("once", "gw2", T0 + 1500, 1000)  # expired: taken over
    assert not await store.take_lease("once", "gw1", T0 + 1600, 1000)
    await store.release_lease("once", "gw1")  # not gw1's: nothing
    assert not await store.take_lease("once", "gw1", T0 + 1700, 1000)
    await store.release_lease("once", "gw2")
    assert await store.take_lease("once", "gw1", T0 + 1800, 1000)


def reading(vehicle: str, kind: str, ts: int, **fields: object) -> StoredReading:
    return StoredReading(vehicle, kind, ts, dict(fields))


async def test_the_newest_reading_wins_and_an_older_one_never_replaces_it(store: Store) -> None:
    await store.put_states([reading("ZOE-001", "battery", T0 + 10, soc_pct=80.5)], {"ZOE-001": T0 + 20})
    readings, seen, cursor = await store.states_changed_since(0)
    assert readings == [reading("ZOE-001", "battery", T0 + 10, soc_pct=80.5)] and seen == {"ZOE-001": T0 + 20}
    # A car replaying what it buffered offline, heard from earlier by another gateway: nothing moves back.
    await store.put_states([reading("ZOE-001", "battery", T0 + 5, soc_pct=90.0)], {"ZOE-001": T0 + 15})
    assert await store.states_changed_since(cursor) == ([], {}, cursor)
    assert (await store.states_changed_since(0))[:2] == (readings, seen)
    # Equal times: the later write wins, as FleetState.update does.
    await store.put_states([reading("ZOE-001", "battery", T0 + 10, soc_pct=79.0)], {})
    got, _, _ = await store.states_changed_since(cursor)
    assert got == [reading("ZOE-001", "battery", T0 + 10, soc_pct=79.0)]


async def test_a_batch_of_500_readings_is_stored_in_one_call(store: Store) -> None:
    kinds = ("battery", "location", "doors", "status")
    batch = [
        reading(f"ZOE-{n // 4:03d}", kinds[n % 4], T0 + n, value=n, nested={"ok": True, "x": [1.5, None]})
        for n in range(500)
    ]
    # Within one batch a row may come twice: the newest counts, whatever the order.
    batch += [reading("ZOE-000", "battery", T0 - 1, value=-1), reading("ZOE-001", "battery", T0 + 999, value=-2)]
    seen = {f"ZOE-{v:03d}": T0 + 1000 + v for v in range(125)}
    await store.put_states(batch, seen)
    readings, got_seen, cursor = await store.states_changed_since(0)
    want = {(r.vehicle_id, r.kind): r for r in batch[:500]}
    want[("ZOE-001", "battery")] = batch[-1]
    assert {(r.vehicle_id, r.kind): r for r in readings} == want and len(readings) == 500
    assert got_seen == seen and cursor > 0


async def test_changed_since_returns_only_what_changed_after_the_cursor(store: Store) -> None:
    await store.put_states(
        [reading("ZOE-001", "battery", T0, soc_pct=50), reading("ZOE-002", "battery", T0, soc_pct=60)],
        {"ZOE-001": T0, "ZOE-002": T0},
    )
    _, _, first = await store.states_changed_since(0)
    await store.put_states([reading("ZOE-002", "location", T0 + 1, lat=48.4)], {"ZOE-002": T0 + 1})
    readings, seen, second = await store.states_changed_since(first)
    assert readings == [reading("ZOE-002", "location", T0 + 1, lat=48.4)] and seen == {"ZOE-002": T0 + 1}
    assert second > first
    # last_seen is the latest ever heard: an earlier time is not a change.
    await store.put_states([], {"ZOE-001": T0 - 5, "ZOE-002": T0 + 9})
    assert (await store.states_changed_since(second))[:2] == ([], {"ZOE-002": T0 + 9})
    _, all_seen, _ = await store.states_changed_since(0)
    assert all_seen == {"ZOE-001": T0, "ZOE-002": T0 + 9}
    await store.put_states([], {})  # nothing to write: nothing changes
    _, _, third = await store.states_changed_since(second)
    assert await store.states_changed_since(third) == ([], {}, third)


async def test_a_writer_reading_back_gets_only_the_others_changes(store: Store) -> None:
    assert await store.put_states([], {}) == 0  # nothing written: no batch of its own
    theirs = await store.put_states([reading("ZOE-001", "battery", T0, soc_pct=50)], {"ZOE-001": T0})
    mine = await store.put_states([reading("ZOE-002", "battery", T0, soc_pct=60)], {"ZOE-002": T0})
    assert mine > theirs > 0
    readings, seen, cursor = await store.states_changed_since(0, mine)
    assert readings == [reading("ZOE-001", "battery", T0, soc_pct=50)] and seen == {"ZOE-001": T0}
    assert cursor == mine  # past its own batch, which is then never read
    assert await store.states_changed_since(cursor) == ([], {}, cursor)
    # Its own row overwritten by another writer's newer reading is theirs, and comes.
    await store.put_states([reading("ZOE-002", "battery", T0 + 1, soc_pct=59)], {})
    readings, _, _ = await store.states_changed_since(cursor, mine)
    assert readings == [reading("ZOE-002", "battery", T0 + 1, soc_pct=59)]
    # A batch that changes nothing (every reading older than the stored one) has no number of its own, so
    # the next writer's batch is never taken for it.
    stale = await store.put_states([reading("ZOE-002", "battery", T0 - 5, soc_pct=1)], {"ZOE-002": T0 - 5})
    theirs = await store.put_states([reading("ZOE-004", "battery", T0, soc_pct=40)], {})
    readings, _, _ = await store.states_changed_since(cursor, stale)
    assert reading("ZOE-004", "battery", T0, soc_pct=40) in readings and theirs != stale
    # Only its own batch: nothing to read, the cursor still moves past it.
    last = await store.put_states([reading("ZOE-003", "doors", T0, locked=True)], {})
    assert await store.states_changed_since(last - 1, last) == ([], {}, last)


async def test_an_idempotency_key_is_claimed_by_one_holder_then_replays_its_outcome(store: Store) -> None:
    o = Outcome("c-1", "ZOE-001", "unlock", "done", None, 12.5, None, T0)
    assert await store.claim_idempotency_key("booking", "k", "fp", "gw1", T0, ttl_ms=1000) == "claimed"
    assert await store.claim_idempotency_key("booking", "k", "fp", "gw2", T0 + 1, ttl_ms=1000) == "pending"
    assert await store.claim_idempotency_key("booking", "k", "fp", "gw1", T0 + 500, ttl_ms=1000) == "claimed"
    assert await store.claim_idempotency_key("booking", "k", "fp", "gw2", T0 + 1000, ttl_ms=1000) == "pending"
    assert await store.claim_idempotency_key("other", "k", "fp", "gw2", T0, ttl_ms=1000) == "claimed"  # per caller
    await store.save_idempotent_outcome("booking", "k", "fp", o, T0 + 600)
    assert await store.claim_idempotency_key("booking", "k", "fp-2", "gw2", T0 + 700) == ("fp", o)
    assert await store.claim_idempotency_key("booking", "k", "fp", "gw1", T0 + 700) == ("fp", o)
    # A holder that gave up (its request failed) frees the key at once; one that crashed, when it expires.
    assert await store.claim_idempotency_key("booking", "j", "fp", "gw1", T0, ttl_ms=1000) == "claimed"
    await store.release_idempotency_key("booking", "j", "gw2")  # not gw2's: nothing
    assert await store.claim_idempotency_key("booking", "j", "fp", "gw2", T0 + 1, ttl_ms=1000) == "pending"
    await store.release_idempotency_key("booking", "j", "gw1")
    assert await store.claim_idempotency_key("booking", "j", "fp", "gw2", T0 + 2, ttl_ms=1000) == "claimed"
    assert await store.claim_idempotency_key("booking", "j", "fp", "gw1", T0 + 1001, ttl_ms=1000) == "pending"
    assert await store.claim_idempotency_key("booking", "j", "fp", "gw1", T0 + 1002, ttl_ms=1000) == "claimed"
    # Pruning forgets expired claims only; a live one stays claimed.
    assert await store.prune(T0 + 1500) == 1  # "other"/"k", expired at T0 + 1000
    assert await store.claim_idempotency_key("booking", "j", "fp", "gw2", T0 + 1500, ttl_ms=1000) == "pending"
