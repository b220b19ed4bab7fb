"""Staff priority through the HTTP API, with the real store, broker and a webhook receiver.

Bellême has three Zoés (ZOE-007, ZOE-008, ZOE-009): a staff booking of one
makes room by moving a public booking to another, or cancelling it with a
day's notice, or is refused — and the booking system is told by an event.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import Stack, Unique
from tests.helpers import AUTH, mosquitto_pub
from tests.test_alerts_integration import Env, start

pytestmark = pytest.mark.integration


def at(hours: float) -> str:
    return (datetime.now(UTC) + timedelta(hours=hours)).isoformat(timespec="milliseconds")


def booking(vehicle: str, start_h: float, end_h: float, kind: str = "public", user: str = "U-1") -> dict[str, Any]:
    return {"vehicle_id": vehicle, "user_id": user, "starts_at": at(start_h), "ends_at": at(end_h), "kind": kind}


@pytest.fixture
async def env(stack: Stack, unique: Unique, tmp_path: Path, aiohttp_client: Callable[..., Any]) -> AsyncIterator[Env]:
    e = await start(stack, unique, tmp_path, aiohttp_client)
    yield e
    await e.receiver.stop()


async def put(env: Env, rid: str, doc: dict[str, Any]) -> tuple[int, Any]:
    r = await env.client.put(f"/v1/reservations/{rid}", json=doc, headers=AUTH)
    return r.status, await r.json()


async def get(env: Env, rid: str) -> tuple[int, Any]:
    r = await env.client.get(f"/v1/reservations/{rid}", headers=AUTH)
    return r.status, await r.json()


async def events(env: Env, type_: str) -> list[dict[str, Any]]:
    return [e["data"] for e in (await env.get("/v1/events", type=type_))["events"]]


async def test_a_public_booking_is_moved_to_another_car_of_its_model(env: Env) -> None:
    assert (await put(env, "P-1", booking("ZOE-007", 48, 50)))[0] == 201
    assert (await put(env, "P-other", booking("ZOE-008", 40, 42)))[0] == 201  # ZOE-008 is free over P-1's span
    status, staff = await put(env, "S-1", booking("ZOE-007", 47, 51, "staff", "STAFF-1"))
    assert status == 201, staff
    assert staff["displaced"] == [{"reservation_id": "P-1", "action": "reassigned", "vehicle_id": "ZOE-008"}]
    _, moved = await get(env, "P-1")
    assert (moved["vehicle_id"], moved["status"], moved["cancel_reason"]) == ("ZOE-008", "active", None)
    data = {"reservation_id": "P-1", "user_id": "U-1", "from_vehicle_id": "ZOE-007", "to_vehicle_id": "ZOE-008",
            "by_reservation_id": "S-1"}  # fmt: skip
    assert await events(env, "reservation.reassigned") == [data]
    [told] = await env.receiver.wait(lambda r: r.accepted("reservation.reassigned"), what="the webhook")
    assert told.event["data"] == data
    assert (
        'gateway_reservations_displaced_total{action="reassigned"} 1.0'
        in await (await env.client.get("/metrics")).text()
    )


async def test_failing_that_it_is_cancelled_with_enough_notice(env: Env) -> None:
    for rid, car in (("P-8", "ZOE-008"), ("P-9", "ZOE-009")):
        assert (await put(env, rid, booking(car, 47, 52)))[0] == 201
    assert (await put(env, "P-1", booking("ZOE-007", 48, 50)))[0] == 201
    status, staff = await put(env, "S-1", booking("ZOE-007", 47, 51, "staff"))
    assert status == 201 and staff["displaced"] == [
        {"reservation_id": "P-1", "action": "cancelled", "vehicle_id": "ZOE-007"}
    ]
    _, gone = await get(env, "P-1")
    assert (gone["status"], gone["cancel_reason"]) == ("cancelled", "preempted_by_staff")
    [data] = await events(env, "reservation.preempted")
    assert data["to_vehicle_id"] is None and data["by_reservation_id"] == "S-1"
    await env.receiver.wait(lambda r: r.accepted("reservation.preempted"), what="the webhook")


async def test_without_enough_notice_it_is_refused_and_nothing_changes(env: Env) -> None:
    for rid, car in (("P-8", "ZOE-008"), ("P-9", "ZOE-009")):
        assert (await put(env, rid, booking(car, 1, 6)))[0] == 201
    assert (await put(env, "P-1", booking("ZOE-007", 2, 4)))[0] == 201
    before = await get(env, "P-1")
    status, err = await put(env, "S-1", booking("ZOE-007", 1.5, 5, "staff"))
    assert status == 409 and err["error"]["code"] == "reservation_conflict"
    assert "P-1" in err["error"]["message"] and "notice" in err["error"]["message"]
    assert await get(env, "P-1") == before
    assert (await get(env, "S-1"))[0] == 404
    assert await events(env, "reservation.preempted") == [] and await events(env, "reservation.reassigned") == []


async def test_a_started_booking_and_staff_ones_are_never_displaced(env: Env) -> None:
    assert (await put(env, "P-now", booking("ZOE-007", -0.5, 2)))[0] == 201  # the renter has the car
    status, err = await put(env, "S-1", booking("ZOE-007", 1, 3, "staff"))
    assert status == 409 and "started" in err["error"]["message"]
    # Starting in 10 minutes: within the early grace its user may be opening the car right now.
    assert (await put(env, "P-soon", booking("ZOE-009", 10 / 60, 2)))[0] == 201
    status, err = await put(env, "S-9", booking("ZOE-009", 0.5, 3, "staff"))
    assert status == 409 and "may open its car" in err["error"]["message"]
    assert (await put(env, "S-a", booking("ZOE-008", 30, 32, "staff")))[0] == 201
    status, err = await put(env, "S-b", booking("ZOE-008", 31, 33, "staff"))
    assert status == 409 and "staff never displace staff" in err["error"]["message"]


async def test_one_that_can_move_and_one_that_cannot_is_409_and_nothing_changes(env: Env) -> None:
    assert (await put(env, "P-8", booking("ZOE-008", 3, 6)))[0] == 201  # ZOE-008 busy early on
    assert (await put(env, "P-9", booking("ZOE-009", 1, 5)))[0] == 201  # ZOE-009 busy early on
    assert (await put(env, "P-late", booking("ZOE-007", 8, 9)))[0] == 201  # could move to ZOE-008 or -009
    assert (await put(env, "P-soon", booking("ZOE-007", 3.5, 4.5)))[0] == 201  # cannot move, no notice
    status, _ = await put(env, "S-1", booking("ZOE-007", 3, 10, "staff"))
    assert status == 409
    for rid in ("P-late", "P-soon"):
        _, r = await get(env, rid)
        assert (r["vehicle_id"], r["status"]) == ("ZOE-007", "active")


async def test_two_staff_bookings_racing_for_the_last_free_car(env: Env) -> None:
    # Each staff car has a public booking within the notice; only ZOE-009 is free for either of them.
    assert (await put(env, "P-7", booking("ZOE-007", 5, 7)))[0] == 201
    assert (await put(env, "P-8", booking("ZOE-008", 5, 7)))[0] == 201
    (sa, a), (sb, b) = await asyncio.gather(
        put(env, "S-a", booking("ZOE-007", 4, 8, "staff")), put(env, "S-b", booking("ZOE-008", 4, 8, "staff"))
    )
    assert sorted([sa, sb]) == [201, 409], (a, b)
    placed = {rid: (await get(env, rid))[1] for rid in ("P-7", "P-8")}
    assert all(p["status"] == "active" for p in placed.values())  # none lost
    cars = sorted(p["vehicle_id"] for p in placed.values())
    assert cars in (["ZOE-008", "ZOE-009"], ["ZOE-007", "ZOE-009"])  # one moved to ZOE-009, none doubled
    listing = (await env.get("/v1/reservations", vehicle_id="ZOE-009"))["reservations"]
    assert [r["reservation_id"] for r in listing] in (["P-7"], ["P-8"])


async def test_availability_lists_the_free_cars_with_their_charge(env: Env) -> None:
    await mosquitto_pub(env.broker_port, f"{env.unique.prefix}/ZOE-009/battery",
                        orjson.dumps({"soc_pct": 77.5, "range_km": 240}))  # fmt: skip
    assert (await put(env, "P-7", booking("ZOE-007", 1, 3)))[0] == 201
    for _ in range(50):
        got = await env.get("/v1/availability", station="belleme", model="zoe", **{"from": at(2), "to": at(4)})
        if got["vehicles"] and got["vehicles"][-1]["soc_pct"] is not None:
            break
        await asyncio.sleep(0.1)
    assert [v["vehicle_id"] for v in got["vehicles"]] == ["ZOE-008", "ZOE-009"]
    assert got["vehicles"][1] == {"vehicle_id": "ZOE-009", "model": "zoe", "station": "belleme", "soc_pct": 77.5,
                                  "range_km": 240}  # fmt: skip
    later = await env.get("/v1/availability", station="belleme", **{"from": at(3.5), "to": at(5)})
    assert [v["vehicle_id"] for v in later["vehicles"]] == ["ZOE-007", "ZOE-008", "ZOE-009"]
    for params in ({"station": "nowhere"}, {"model": "tesla"}, {"from": at(2), "to": at(1)}, {"limit": "5"}):
        r = await env.client.get("/v1/availability", params=params, headers=AUTH)
        assert r.status == 400 and (await r.json())["error"]["code"] == "bad_query"
