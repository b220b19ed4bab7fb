"""The pure reservation rules: validity, overlaps, updates and when a car may open. No I/O, no clock."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gateway.errors import InvalidReservation, ReservationNotActive
from gateway.rules.reservations import (
    EARLIEST_MS,
    LATEST_MS,
    MAX_SPAN_MS,
    Reservation,
    ReservationRequest,
    StartUnlock,
    check_locks,
    check_opens,
    conflict,
    merge_update,
    new_reservation,
)

H = 3_600_000
NOW = 1_795_680_000_000
VEHICLES = {"ZOE-001", "ZOE-002"}
GRACE = 15 * 60_000


def req(vehicle: str = "ZOE-001", start_h: float = 1, end_h: float = 2, **kw: object) -> ReservationRequest:
    base = ReservationRequest(vehicle, "U-1", int(NOW + start_h * H), int(NOW + end_h * H), "public", False)
    return replace(base, **kw)  # type: ignore[arg-type]


def res(rid: str = "R-1", **kw: object) -> Reservation:
    return new_reservation(rid, req(**kw), VEHICLES, NOW, "booking")  # type: ignore[arg-type]


def test_a_valid_request_becomes_a_reservation_stamped_now_and_by_whom() -> None:
    r = res()
    assert (r.id, r.vehicle_id, r.user_id, r.kind, r.unlock_at_start) == ("R-1", "ZOE-001", "U-1", "public", False)
    assert r.created_ms == r.updated_ms == NOW and r.created_by == "booking" and not r.cancelled


@pytest.mark.parametrize(
    ("rid", "request_", "field"),
    [
        ("R 1", req(), "reservation_id"),
        ("-R", req(), "reservation_id"),
        ("R-1\n", req(), "reservation_id"),  # a trailing newline is not part of an id
        ("x" * 65, req(), "reservation_id"),
        ("R-1", req(vehicle="NOPE-1"), "vehicle_id"),
        ("R-1", req(user_id=""), "user_id"),
        ("R-1", req(user_id="u" * 129), "user_id"),
        ("R-1", req(user_id="u\x00"), "user_id"),
        ("R-1", req(start_h=2, end_h=1), "ends_at"),
        ("R-1", req(start_h=1, end_h=1), "ends_at"),
        ("R-1", req(end_h=1 + MAX_SPAN_MS / H + 0.01), "ends_at"),
        ("R-1", req(starts_ms=EARLIEST_MS - 1), "starts_at"),
        ("R-1", req(ends_ms=LATEST_MS), "ends_at"),
    ],
)
def test_each_bad_field_is_named(rid: str, request_: ReservationRequest, field: str) -> None:
    with pytest.raises(InvalidReservation) as e:
        new_reservation(rid, request_, VEHICLES, NOW)
    assert e.value.field == field and str(e.value).startswith(f"{field}: ")


def test_thirty_one_days_exactly_is_allowed() -> None:
    assert res(end_h=1 + MAX_SPAN_MS / H).ends_ms - res().starts_ms == MAX_SPAN_MS


@pytest.mark.parametrize(
    ("other", "clashes"),
    [
        (dict(start_h=1.5, end_h=3), True),
        (dict(start_h=0, end_h=1.5), True),
        (dict(start_h=0, end_h=3), True),
        (dict(start_h=1.2, end_h=1.8), True),
        (dict(start_h=2, end_h=3), False),  # back to back
        (dict(start_h=0, end_h=1), False),
        (dict(vehicle="ZOE-002", start_h=1, end_h=2), False),
    ],
)
def test_overlaps_of_the_same_car_conflict(other: dict[str, object], clashes: bool) -> None:
    candidate = res("R-new")
    found = conflict(candidate, [res("R-old", **other)], NOW)
    assert (found is not None) == clashes


def test_cancelled_ended_or_the_same_reservation_never_conflict() -> None:
    candidate = res("R-1")
    assert conflict(candidate, [replace(res("R-2"), cancelled=True)], NOW) is None
    assert conflict(candidate, [res("R-3", start_h=-3, end_h=1.5)], NOW + 2 * H) is None  # R-3 has ended
    assert conflict(candidate, [res("R-1", start_h=0, end_h=3)], NOW) is None


def test_an_update_keeps_history_and_rearms_a_moved_start_unlock() -> None:
    done = StartUnlock("done", NOW, "c-1")
    old = replace(res(unlock_at_start=True), start_unlock=done, created_ms=NOW - H, created_by="first-key")
    same_start = merge_update(old, res(unlock_at_start=True, end_h=3), NOW + 1)
    assert same_start.start_unlock == done and same_start.created_ms == NOW - H and same_start.updated_ms == NOW + 1
    assert same_start.created_by == "first-key"
    assert merge_update(old, res(unlock_at_start=True, start_h=1.5), NOW).start_unlock is None
    assert merge_update(old, res(vehicle="ZOE-002", unlock_at_start=True), NOW).start_unlock is None
    assert merge_update(old, res(unlock_at_start=False), NOW).start_unlock is None
    in_flight = replace(old, start_unlock=StartUnlock("pending", NOW))
    assert merge_update(in_flight, res(unlock_at_start=True, start_h=1.5), NOW).start_unlock == in_flight.start_unlock


@pytest.mark.parametrize(
    ("now", "vehicle", "opens"),
    [
        (NOW + 1 * H, "ZOE-001", True),  # at the start
        (NOW + 1 * H - GRACE, "ZOE-001", True),  # the early grace
        (NOW + 1 * H - GRACE - 1, "ZOE-001", False),
        (NOW + 2 * H - 1, "ZOE-001", True),
        (NOW + 2 * H, "ZOE-001", False),  # ended
        (NOW + 1 * H, "ZOE-002", False),  # another car
    ],
)
def test_when_a_reservation_opens_its_car(now: int, vehicle: str, opens: bool) -> None:
    r = res()
    if opens:
        check_opens(r, vehicle, now, GRACE)
    else:
        with pytest.raises(ReservationNotActive):
            check_opens(r, vehicle, now, GRACE)


def test_a_cancelled_reservation_opens_nothing_but_an_ended_one_may_still_lock() -> None:
    cancelled = replace(res(), cancelled=True)
    with pytest.raises(ReservationNotActive, match="cancelled"):
        check_opens(cancelled, "ZOE-001", NOW + H, GRACE)
    with pytest.raises(ReservationNotActive):
        check_locks(cancelled, "ZOE-001")
    check_locks(res(start_h=-3, end_h=-2), "ZOE-001")  # ended: locking lets nobody in
    with pytest.raises(ReservationNotActive, match="ZOE-001, not ZOE-002"):
        check_locks(res(), "ZOE-002")
