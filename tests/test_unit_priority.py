"""Staff priority and availability (gateway/rules/priority.py): pure, with hypothesis against brute force."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.rules.priority import Move, Plan, Refusal, free_vehicles, make_room
from gateway.rules.reservations import Kind, Reservation

H = 3_600_000
NOW = 1_795_683_600_000
DAY = 24 * H


def res(rid: str, vehicle: str = "ZOE-001", start_h: float = 48, end_h: float = 50, kind: Kind = "public",
        **kw: object) -> Reservation:  # fmt: skip
    return Reservation(rid, vehicle, "U-" + rid, int(NOW + start_h * H), int(NOW + end_h * H), kind, False, **kw)  # type: ignore[arg-type]


STAFF = res("S-1", start_h=47, end_h=51, kind="staff")


def plan(in_the_way: list[Reservation], others: dict[str, list[Reservation]] | None = None,
         started: set[str] | None = None, notice_ms: int = DAY) -> Plan | Refusal:  # fmt: skip
    return make_room(STAFF, in_the_way, others or {}, started or set(), NOW, notice_ms)


def test_a_public_booking_moves_to_a_free_car_of_its_model_at_its_station() -> None:
    p = plan([res("P-1")], {"ZOE-002": [res("X", "ZOE-002", 40, 42)]})
    assert p == Plan((Move(res("P-1"), "reassigned", "ZOE-002"),))


def test_failing_that_it_is_cancelled_with_enough_notice() -> None:
    busy = {"ZOE-002": [res("X", "ZOE-002", 49, 52)]}
    assert plan([res("P-1")], busy) == Plan((Move(res("P-1"), "cancelled", "ZOE-001"),))


def test_without_enough_notice_the_staff_booking_is_refused() -> None:
    soon = res("P-1", start_h=3, end_h=5)
    staff_soon = replace(STAFF, starts_ms=NOW + 2 * H)
    p = make_room(staff_soon, [soon], {}, set(), NOW, DAY)
    assert isinstance(p, Refusal) and p.blocking == soon and "notice" in p.why


def test_a_car_not_back_from_an_overdue_trip_is_not_free_now() -> None:
    assert free_vehicles(CARS, [], NOW, NOW + H, NOW, {"ZOE-002"}) == ["ZOE-001", "ZOE-003", "KANGOO-001"]
    assert free_vehicles(CARS, [], NOW + DAY, NOW + DAY + H, NOW, {"ZOE-002"}) == CARS  # tomorrow it may be


def test_a_booking_whose_car_may_open_now_is_never_touched() -> None:
    soon = res("P-1", start_h=0.2, end_h=2)  # 12 min ahead, within a 15 min early grace
    staff = replace(STAFF, starts_ms=NOW, ends_ms=NOW + 3 * H)
    r = make_room(staff, [soon], {"ZOE-002": []}, set(), NOW, DAY, early_grace_ms=15 * 60_000)
    assert isinstance(r, Refusal) and "may open its car" in r.why
    assert isinstance(make_room(staff, [soon], {"ZOE-002": []}, set(), NOW, DAY), Plan)  # no grace: movable


def test_a_started_booking_or_trip_is_never_touched() -> None:
    started = res("P-1", start_h=-1, end_h=2)
    assert isinstance(r := plan([started], {"ZOE-002": []}), Refusal) and "started" in r.why
    early = res("P-2", start_h=0.1, end_h=2)  # unlocked in the early grace: its trip runs
    assert isinstance(plan([early], {"ZOE-002": []}, started={"P-2"}), Refusal)


def test_staff_never_displace_staff() -> None:
    other_staff = res("S-0", kind="staff")
    r = plan([other_staff], {"ZOE-002": []})
    assert isinstance(r, Refusal) and r.blocking == other_staff and "staff" in r.why


def test_two_bookings_cannot_both_take_the_one_free_car() -> None:
    a, b = res("P-a", start_h=47.5, end_h=49), res("P-b", start_h=48.5, end_h=50.5)  # they overlap each other
    p = plan([b, a], {"ZOE-002": []})
    assert p == Plan((Move(a, "reassigned", "ZOE-002"), Move(b, "cancelled", "ZOE-001")))  # earliest first


def test_one_that_can_move_and_one_that_cannot_refuse_the_whole() -> None:
    movable, stuck = res("P-a", start_h=47, end_h=48), res("P-b", start_h=23.5, end_h=48.5)
    staff = replace(STAFF, starts_ms=NOW + 23 * H)
    # P-b starts in 23.5 h (< a day's notice) and no car is free for it: refused, whatever P-a could do.
    r = make_room(staff, [movable, stuck], {"ZOE-002": [res("X", "ZOE-002", 23, 49)]}, set(), NOW, DAY)
    assert isinstance(r, Refusal) and r.blocking == stuck


def test_cars_are_tried_in_order() -> None:
    p = plan([res("P-1")], {"ZOE-003": [], "ZOE-002": []})
    assert isinstance(p, Plan) and p.moves[0].vehicle_id == "ZOE-003"


# -- availability against brute force --------------------------------------------------------------------

CARS = ["ZOE-001", "ZOE-002", "ZOE-003", "KANGOO-001"]


@st.composite
def reservation_sets(draw: st.DrawFn) -> list[Reservation]:
    out = []
    for i in range(draw(st.integers(0, 12))):
        start = draw(st.integers(-10, 30))
        out.append(
            res(
                f"R-{i}",
                draw(st.sampled_from(CARS)),
                start,
                start + draw(st.integers(1, 8)),
                cancelled=draw(st.booleans()),
                completed=draw(st.integers(0, 4)) == 0,
            )
        )
    return out


@settings(max_examples=300)
@given(rs=reservation_sets(), a=st.integers(-12, 30), span=st.integers(1, 10))
def test_free_cars_are_those_no_live_reservation_overlaps(rs: list[Reservation], a: int, span: int) -> None:
    start, end = NOW + a * H, NOW + (a + span) * H

    def busy(car: str) -> bool:
        # Brute force: step through each still-to-be-used reservation a quarter-hour at a time.
        for r in rs:
            if r.vehicle_id != car or r.cancelled or r.completed:
                continue
            if any(start <= t < end for t in range(r.starts_ms, r.ends_ms, H // 4)) or (
                r.starts_ms <= start < r.ends_ms
            ):
                return True
        return False

    assert free_vehicles(CARS, rs, start, end, NOW) == [c for c in CARS if not busy(c)]
