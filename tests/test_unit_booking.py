"""The booking service with a scripted command sender: no broker, no car, a clock the test sets.

The store is the real SQLite backend in a temporary directory (it opens in
a millisecond); integration tests do the same through the broker and cars.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from gateway.booking.service import Booking
from gateway.booking.start_unlocks import STALE_MARGIN_S, StartUnlocks
from gateway.errors import (
    BrokerUnavailable,
    IdempotencyKeyReused,
    InvalidBody,
    InvalidIdempotencyKey,
    ReservationCancelled,
    ReservationConflict,
    ReservationNotActive,
    StoreError,
    UnknownReservation,
    UnknownVehicle,
)
from gateway.fleet import load_fleet
from gateway.rules.commands import Action, Outcome, Result
from gateway.rules.reservations import ReservationRequest, StartUnlock
from gateway.rules.trips import Readings, start_trip
from gateway.store.sqlite import SqliteStore, open_sqlite
from tests.helpers import REPO, async_wait_for

FLEET = load_fleet(REPO / "config" / "fleet.yaml")
H = 3_600_000
T0 = 1_795_680_000_000
ACK_TIMEOUT_S = 10.0  # commands.ack_timeout_s, as the app passes it to StartUnlocks


@dataclass
class ScriptedSender:
    """Answers every command with `result`; `down` raises BrokerUnavailable; `gate` holds answers back."""

    result: Result = "done"
    down: bool = False
    gate: asyncio.Event | None = None
    sent: list[tuple[str, Action, str | None, str]] = field(default_factory=list)
    attempts: int = 0  # sends tried, also those that found the broker down

    async def send(
        self, vehicle_id: str, action: Action, reservation_id: str | None, caller: str, command_id: str
    ) -> Outcome:
        self.attempts += 1
        if self.down:
            raise BrokerUnavailable("the MQTT broker is not connected")
        self.sent.append((vehicle_id, action, reservation_id, caller))
        if self.gate is not None:
            await self.gate.wait()
        n = len(self.sent)
        reason = None if self.result == "done" else "door_open"
        return Outcome(command_id, vehicle_id, action, self.result, reason, 12.0 + n, None, T0)


@dataclass
class Clock:
    now: int = T0

    def __call__(self) -> int:
        return self.now


@dataclass
class World:
    booking: Booking
    sender: ScriptedSender
    clock: Clock
    store: SqliteStore
    points: list[bytes]


@pytest.fixture
async def w(tmp_path: Path) -> AsyncIterator[World]:
    store = open_sqlite(tmp_path / "gateway.sqlite3")
    sender, clock, points = ScriptedSender(), Clock(), list[bytes]()
    booking = Booking(store, FLEET, sender, points.append, early_grace_s=900, clock=clock)
    yield World(booking, sender, clock, store, points)
    await store.close()


def req(vehicle: str = "ZOE-001", start_h: float = -0.1, end_h: float = 1, unlock: bool = False) -> ReservationRequest:
    return ReservationRequest(vehicle, "U-1", int(T0 + start_h * H), int(T0 + end_h * H), "public", unlock)


async def test_put_creates_then_updates_and_records_the_point(w: World) -> None:
    r, created, _ = await w.booking.put("R-1", req(), "booking")
    assert created and r.created_by == "booking"
    w.clock.now += 1000
    r2, created2, _ = await w.booking.put("R-1", req(end_h=2), "other-key")
    assert not created2 and r2.created_ms == r.created_ms and r2.updated_ms == T0 + 1000
    assert r2.created_by == "booking"  # who created it stays: its start unlock is theirs
    assert len(w.points) == 2 and all(p.startswith(b"reservations,") for p in w.points)


async def test_a_conflict_names_the_reservation_in_the_way(w: World) -> None:
    await w.booking.put("R-1", req(), "booking")
    with pytest.raises(ReservationConflict) as e:
        await w.booking.put("R-2", req(start_h=0.5, end_h=2), "booking")
    assert e.value.other_id == "R-1" and "R-1" in e.value.message
    assert await w.store.get_reservation("R-2") is None


async def test_a_cancelled_reservation_cannot_come_back(w: World) -> None:
    await w.booking.put("R-1", req(), "booking")
    await w.booking.cancel("R-1")
    await w.booking.cancel("R-1")  # twice is fine
    with pytest.raises(ReservationCancelled):
        await w.booking.put("R-1", req(), "booking")
    with pytest.raises(UnknownReservation):
        await w.booking.cancel("R-nope")
    for impossible in ("R-\x00", "x" * 65, ""):  # no such id is ever stored (PostgreSQL refuses U+0000): 404
        with pytest.raises(UnknownReservation):
            await w.booking.get(impossible)


async def test_a_completed_reservation_cannot_be_reopened(w: World) -> None:
    r, _, _ = await w.booking.put("R-1", req(), "booking")
    assert await w.store.start_trip(start_trip(r, "alencon-cd61", Readings(), T0))
    trip = await w.store.get_trip("R-1")
    assert trip is not None and await w.store.end_trip(replace(trip, ended_ms=T0 + 60_000, ended_by="user"), "2026-11")
    with pytest.raises(ReservationNotActive, match="has ended"):
        await w.booking.put("R-1", req(end_h=3), "booking")
    stored = await w.store.get_reservation("R-1")
    assert stored is not None and stored.completed
    with pytest.raises(ReservationNotActive):
        await w.booking.command("ZOE-001", "unlock", "R-1", "booking")
    assert w.sender.sent == []


async def test_unlock_checks_then_sends_once_and_audits_the_caller(w: World) -> None:
    await w.booking.put("R-1", req(), "booking")
    o = await w.booking.command("ZOE-001", "unlock", "R-1", "front-desk")
    assert o.result == "done" and w.sender.sent == [("ZOE-001", "unlock", "R-1", "front-desk")]
    (audit,) = await w.store.list_commands("ZOE-001", None, None, 10)
    assert (audit.command_id, audit.caller, audit.source, audit.result) == (o.command_id, "front-desk", "api", "done")


@pytest.mark.parametrize(
    ("vehicle", "rid", "error"),
    [
        ("NOPE-1", "R-1", UnknownVehicle),
        ("ZOE-001", "R-nope", UnknownReservation),
        ("ZOE-002", "R-1", ReservationNotActive),
        ("ZOE-001", None, InvalidBody),
    ],
)
async def test_refused_unlocks_send_nothing(w: World, vehicle: str, rid: str | None, error: type[Exception]) -> None:
    await w.booking.put("R-1", req(), "booking")
    with pytest.raises(error):
        await w.booking.command(vehicle, "unlock", rid, "booking")
    assert w.sender.sent == []
    assert await w.store.list_commands("ZOE-001", None, None, 10) == []


async def test_the_clock_decides_when_a_reservation_opens(w: World) -> None:
    await w.booking.put("R-later", req(start_h=1, end_h=2), "booking")
    with pytest.raises(ReservationNotActive, match="starts at"):
        await w.booking.command("ZOE-001", "unlock", "R-later", "booking")
    w.clock.now = T0 + H - 15 * 60_000  # the early grace
    assert (await w.booking.command("ZOE-001", "unlock", "R-later", "booking")).result == "done"
    w.clock.now = T0 + 2 * H
    with pytest.raises(ReservationNotActive, match="ended"):
        await w.booking.command("ZOE-001", "unlock", "R-later", "booking")
    assert (await w.booking.command("ZOE-001", "lock", "R-later", "booking")).result == "done"  # locking still may


async def test_a_lock_needs_no_reservation(w: World) -> None:
    assert (await w.booking.command("ZOE-003", "lock", None, "ops")).result == "done"


async def test_broker_down_is_audited_and_raised(w: World) -> None:
    await w.booking.put("R-1", req(), "booking")
    w.sender.down = True
    with pytest.raises(BrokerUnavailable):
        await w.booking.command("ZOE-001", "unlock", "R-1", "booking")
    (audit,) = await w.store.list_commands("ZOE-001", None, None, 10)
    assert audit.result == "broker_unavailable" and audit.latency_ms is None and audit.caller == "booking"


async def test_an_idempotency_key_replays_the_first_outcome(w: World) -> None:
    await w.booking.put("R-1", req(), "booking")
    first = await w.booking.command("ZOE-001", "unlock", "R-1", "booking", "k-1")
    again = await w.booking.command("ZOE-001", "unlock", "R-1", "booking", "k-1")
    assert again == first and len(w.sender.sent) == 1
    with pytest.raises(IdempotencyKeyReused):
        await w.booking.command("ZOE-001", "lock", "R-1", "booking", "k-1")
    # Keys belong to their caller: the same key from another caller is another request.
    assert (await w.booking.command("ZOE-001", "unlock", "R-1", "other", "k-1")).command_id != first.command_id


async def test_retries_while_the_first_call_waits_share_its_outcome(w: World) -> None:
    await w.booking.put("R-1", req(), "booking")
    w.sender.gate = asyncio.Event()
    calls = [asyncio.create_task(w.booking.command("ZOE-001", "unlock", "R-1", "booking", "k")) for _ in range(3)]
    await asyncio.sleep(0)
    with pytest.raises(IdempotencyKeyReused, match="in use"):
        await w.booking.command("ZOE-002", "lock", None, "booking", "k")
    w.sender.gate.set()
    outcomes = await asyncio.gather(*calls)
    assert len(set(outcomes)) == 1 and len(w.sender.sent) == 1


async def test_a_refusal_is_not_kept_under_the_key(w: World) -> None:
    await w.booking.put("R-1", req(start_h=1, end_h=2), "booking")
    with pytest.raises(ReservationNotActive):
        await w.booking.command("ZOE-001", "unlock", "R-1", "booking", "k")
    w.clock.now = T0 + H
    assert (await w.booking.command("ZOE-001", "unlock", "R-1", "booking", "k")).result == "done"


@pytest.mark.parametrize("key", ["", "x" * 201, "caf\u00e9", "tab\there"])
async def test_a_bad_idempotency_key_is_refused(w: World, key: str) -> None:
    with pytest.raises(InvalidIdempotencyKey):
        await w.booking.command("ZOE-001", "lock", None, "booking", key)


# ---- the start-time unlock -------------------------------------------------------------------------


async def run_until(starts: StartUnlocks, until: Callable[[], Awaitable[bool]], timeout: float = 2.0) -> None:
    """Run the scheduler until `until()` holds, then stop it as the app would."""
    task = asyncio.create_task(starts.run())
    try:
        await async_wait_for(until, timeout=timeout, what="the start unlock")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await starts.close()


async def test_a_due_start_unlock_is_sent_once_as_its_creator(w: World) -> None:
    await w.booking.put("R-s", req(unlock=True), "front-desk")
    await w.booking.put("R-later", req("ZOE-002", start_h=1, end_h=2, unlock=True), "front-desk")

    async def recorded() -> bool:
        r = await w.store.get_reservation("R-s")
        return r is not None and r.start_unlock is not None and r.start_unlock.status == "done"

    await run_until(StartUnlocks(w.store, w.booking, ACK_TIMEOUT_S, w.clock), recorded)
    assert w.sender.sent == [("ZOE-001", "unlock", "R-s", "front-desk")]
    (audit,) = await w.store.list_commands("ZOE-001", None, None, 10)
    assert audit.source == "start_unlock" and audit.caller == "front-desk"


async def test_broker_down_releases_the_claim_and_a_crash_claim_is_sent_again(w: World) -> None:
    await w.booking.put("R-s", req(unlock=True), "booking")
    w.sender.down = True

    async def audited() -> bool:
        return bool(await w.store.list_commands("ZOE-001", None, None, 10))

    await run_until(StartUnlocks(w.store, w.booking, ACK_TIMEOUT_S, w.clock), audited)
    r = await w.store.get_reservation("R-s")
    assert r is not None and r.start_unlock is None  # released, so it is tried again
    # A claim left by a crash (sent, outcome never recorded) is sent again once nobody can be waiting for it.
    assert await w.store.claim_start_unlock(
        "R-s", StartUnlock("pending", w.clock() - int((ACK_TIMEOUT_S + STALE_MARGIN_S) * 1000) - 1)
    )
    w.sender.down = False

    async def sent() -> bool:
        return bool(w.sender.sent)

    await run_until(StartUnlocks(w.store, w.booking, ACK_TIMEOUT_S, w.clock), sent)
    assert w.sender.sent == [("ZOE-001", "unlock", "R-s", "booking")]


async def test_a_young_claim_may_have_a_sender_still_waiting_and_is_not_sent_again(w: World) -> None:
    # The gateway that held the lease before may still wait for the car's ack: a second unlock now would be
    # a second command for one start. Once the claim is older than any wait, it is sent again.
    await w.booking.put("R-s", req(unlock=True), "booking")
    assert await w.store.claim_start_unlock("R-s", StartUnlock("pending", w.clock() - 1000))
    starts = StartUnlocks(w.store, w.booking, 1.0, w.clock, idle_s=0.05)  # abandoned after 1 + 5 s
    task = asyncio.create_task(starts.run())
    try:
        await asyncio.sleep(0.3)  # several passes of the scheduler
        assert w.sender.sent == []
        w.clock.now += 5_100  # the claim is now 6.1 s old
        await async_wait_for(lambda: w.sender.sent, timeout=3, what="the abandoned claim sent again")
        assert w.sender.sent == [("ZOE-001", "unlock", "R-s", "booking")]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await starts.close()


async def test_a_store_error_after_the_car_acted_keeps_the_answer(w: World) -> None:
    await w.booking.put("R-1", req(), "booking")

    async def broken(*args: object) -> None:
        raise StoreError("the store could not save an idempotency key: disk I/O error")

    w.booking.store = StoreWithBrokenWrites(w.store, broken)  # type: ignore[assignment]
    o = await w.booking.command("ZOE-001", "unlock", "R-1", "booking", "k")
    assert o.result == "done" and len(w.sender.sent) == 1


class StoreWithBrokenWrites:
    """The real store, but saving idempotency keys and audit records fails."""

    def __init__(self, store: SqliteStore, broken: Callable[..., Awaitable[None]]) -> None:
        self._store = store
        self.save_idempotent_outcome = broken
        self.record_command = broken

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)


async def test_a_command_cancelled_while_the_car_has_it_is_audited(w: World) -> None:
    await w.booking.put("R-1", req(), "booking")
    w.sender.gate = asyncio.Event()  # the car never answers
    task = asyncio.create_task(w.booking.command("ZOE-001", "unlock", "R-1", "booking"))
    await async_wait_for(lambda: w.sender.sent, what="the command sent")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (audit,) = await w.store.list_commands("ZOE-001", None, None, 10)
    assert (audit.result, audit.reason, audit.latency_ms) == ("timeout", "gateway_stopped", None)


async def test_while_the_broker_is_down_a_start_unlock_is_audited_once(w: World) -> None:
    await w.booking.put("R-s", req(unlock=True), "booking")
    w.sender.down = True

    async def retried() -> bool:
        return w.sender.attempts >= 3

    await run_until(StartUnlocks(w.store, w.booking, ACK_TIMEOUT_S, w.clock), retried, timeout=5)
    audits = await w.store.list_commands("ZOE-001", None, None, 10)
    assert [a.result for a in audits] == ["broker_unavailable"]
