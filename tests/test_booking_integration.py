"""The booking system's API end to end, with the simulator as the cars.

Real Mosquitto, real InfluxDB, the gateway in-process, and simulated cars
that verify signatures with their own keys and answer as the contract says.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from device_sim import Behaviour, SimConfig, SimFleet
from gateway.app import init_app
from gateway.fleet import load_fleet
from gateway.rules.commands import CommandRecord
from gateway.rules.reservations import ReservationRequest, new_reservation
from gateway.store.sqlite import open_sqlite
from gateway.times import now_ms, rfc3339_ms
from tests.conftest import Stack, Unique
from tests.helpers import (
    API_KEY,
    AUTH,
    MASTER_KEY,
    REPO,
    Parts,
    async_wait_for,
    both_links_up,
    gateway_settings,
    influx_query,
)

pytestmark = pytest.mark.integration

FLEET = load_fleet(REPO / "config" / "fleet.yaml")
ACK_TIMEOUT_S = 2.0


def at(minutes: float) -> str:
    return (datetime.now(UTC) + timedelta(minutes=minutes)).isoformat(timespec="milliseconds")


def body(vehicle: str = "ZOE-001", start: float = -5, end: float = 60, **extra: Any) -> dict[str, Any]:
    return {
        "vehicle_id": vehicle,
        "user_id": "U-42",
        "starts_at": at(start),
        "ends_at": at(end),
        "kind": "public",
    } | extra


class Env:
    def __init__(self, client: TestClient[Any, Any], sim: SimFleet, stack: Stack, unique: Unique) -> None:
        self.client = client
        self.sim = sim
        self.stack = stack
        self.unique = unique

    @property
    def rt(self) -> Any:
        return Parts(self.client.app)

    async def put(self, rid: str, data: dict[str, Any]) -> tuple[int, Any]:
        r = await self.client.put(f"/v1/reservations/{rid}", json=data, headers=AUTH)
        return r.status, await r.json()

    async def post(self, path: str, data: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        r = await self.client.post(path, json=data, headers={**AUTH, **(headers or {})})
        return r.status, await r.json()

    def q(self, query: str) -> list[dict[str, Any]]:
        return influx_query(self.stack.influx.port, self.unique.database, query)


async def start_env(
    stack: Stack, unique: Unique, state_dir: Path, aiohttp_client: Callable[..., Any], sim: SimFleet, **over: Any
) -> Env:
    settings = gateway_settings(
        stack.broker.port,
        f"http://127.0.0.1:{stack.influx.port}",
        unique.prefix,
        unique.database,
        state_dir,
        commands__ack_timeout_s=ACK_TIMEOUT_S,
        **over,
    )
    client = await aiohttp_client(init_app(settings, FLEET))
    env = Env(client, sim, stack, unique)
    await async_wait_for(lambda: both_links_up(env.rt), what="gateway connected")
    return env


def sim_config(stack: Stack, unique: Unique) -> SimConfig:
    return SimConfig(
        port=stack.broker.port,
        prefix=unique.prefix,
        master_key=MASTER_KEY,
        speed=1,
        seed=7,
        start_hour=3.0,  # night: every car parked and locked at its station
        behaviours={"ZOE-003": Behaviour.NO_ACK, "ZOE-004": Behaviour.FAIL},
    )


@pytest.fixture
async def env(stack: Stack, unique: Unique, tmp_path: Path, aiohttp_client: Callable[..., Any]) -> AsyncIterator[Env]:
    async with SimFleet(sim_config(stack, unique)) as sim:
        await sim.wait_ready(timeout=15)
        yield await start_env(stack, unique, tmp_path, aiohttp_client, sim)


async def test_unlock_happy_path_opens_the_car_and_is_recorded(env: Env) -> None:
    assert env.sim.doors("ZOE-001")[0] is True
    assert (await env.put("R-1", body()))[0] == 201
    status, answer = await env.post("/v1/vehicles/ZOE-001/unlock", {"reservation_id": "R-1"})
    assert status == 200, answer
    assert answer["status"] == "done" and answer["latency_ms"] > 0 and answer["command_id"]
    assert env.sim.doors("ZOE-001")[0] is False
    status, answer2 = await env.post("/v1/vehicles/ZOE-001/lock", {"reservation_id": "R-1"})
    assert status == 200 and env.sim.doors("ZOE-001")[0] is True
    rows = await async_wait_for(lambda: len(r := env.q("SELECT * FROM commands")) >= 2 and r, what="commands rows")
    by_action = {r["action"]: r for r in rows}
    assert by_action["unlock"]["result"] == "done" and by_action["unlock"]["reservation_id"] == "R-1"
    assert by_action["unlock"]["command_id"] == answer["command_id"] and by_action["unlock"]["vehicle_id"] == "ZOE-001"
    assert by_action["lock"]["command_id"] == answer2["command_id"]


async def test_every_unlock_error_status(env: Env) -> None:
    assert (await env.put("R-now", body("ZOE-002")))[0] == 201
    assert (await env.put("R-later", body("ZOE-005", start=60, end=120)))[0] == 201
    assert (await env.put("R-soon", body("ZOE-006", start=10, end=120)))[0] == 201  # inside the 15 min grace
    assert (await env.put("R-past", body("ZOE-007", start=-120, end=-60)))[0] == 201
    assert (await env.put("R-gone", body("ZOE-008")))[0] == 201
    assert (await env.client.delete("/v1/reservations/R-gone", headers=AUTH)).status == 204
    assert (await env.put("R-noack", body("ZOE-003")))[0] == 201
    assert (await env.put("R-fail", body("ZOE-004")))[0] == 201

    cases = [
        ("ZOE-005", "R-later", 409, "reservation_not_active"),
        ("ZOE-007", "R-past", 409, "reservation_not_active"),
        ("ZOE-008", "R-gone", 409, "reservation_not_active"),
        ("ZOE-009", "R-now", 409, "reservation_not_active"),  # another vehicle's reservation
        ("NOPE-1", "R-now", 404, "unknown_vehicle"),
        ("ZOE-002", "R-missing", 404, "unknown_reservation"),
        ("ZOE-004", "R-fail", 502, "command_failed"),
        ("ZOE-003", "R-noack", 504, "vehicle_timeout"),
    ]
    for vehicle, rid, want_status, want_code in cases:
        status, answer = await env.post(f"/v1/vehicles/{vehicle}/unlock", {"reservation_id": rid})
        assert (status, answer["error"]["code"]) == (want_status, want_code), (vehicle, rid, answer)
        assert answer["error"]["message"]
    status, answer = await env.post("/v1/vehicles/ZOE-004/unlock", {"reservation_id": "R-fail"})
    assert answer["error"]["reason"] == "door_open"
    # inside the early grace the car opens
    assert (await env.post("/v1/vehicles/ZOE-006/unlock", {"reservation_id": "R-soon"}))[0] == 200


async def test_command_rejected_by_the_car_is_502(env: Env) -> None:
    # The car checks the signature with its own key: a gateway with another master key is refused.
    from gateway.booking.dispatcher import CommandDispatcher

    rt = env.rt
    forged = CommandDispatcher(rt.command_link, rt.journal, "some-other-master-key", env.unique.prefix, ACK_TIMEOUT_S)
    rt.booking.sender = forged
    rt.ingest.on_ack = forged.on_ack
    assert (await env.put("R-f", body("ZOE-010")))[0] == 201
    status, answer = await env.post("/v1/vehicles/ZOE-010/unlock", {"reservation_id": "R-f"})
    assert (status, answer["error"]["code"], answer["error"]["reason"]) == (502, "command_rejected", "bad_signature")
    assert env.sim.doors("ZOE-010")[0] is True


async def test_bad_bodies_are_400_or_422_never_500(env: Env) -> None:
    bad_puts: list[tuple[Any, int]] = [
        (body(start=10, end=5), 422),
        (body(vehicle="NOPE-1"), 422),
        ({**body(), "kind": "vip"}, 422),
        ({**body(), "starts_at": "tomorrow"}, 422),
        ({**body(), "starts_at": "2026-11-26T09:00:00"}, 422),  # no offset
        ({k: v for k, v in body().items() if k != "user_id"}, 422),
        ({**body(), "unlock_at_start": "yes"}, 422),
        ({**body(), "starts_at": "0001-01-01T00:00:00+01:00"}, 422),  # no UTC form, beyond InfluxDB's range
        ({**body(), "ends_at": "9999-12-31T00:00:00Z"}, 422),
        ([1, 2], 422),
    ]
    for data, want in bad_puts:
        status, answer = await env.put("R-bad", data)
        assert status == want, (data, answer)
        assert answer["error"]["code"] and answer["error"]["message"]
    r = await env.client.put("/v1/reservations/R-bad", data=b"{oops", headers=AUTH)
    assert r.status == 400 and (await r.json())["error"]["code"] == "bad_json"
    r = await env.client.put("/v1/reservations/R-bad", data=b"x" * 200_000, headers=AUTH)
    assert r.status == 413 and (await r.json())["error"]["code"] == "body_too_large"
    status, answer = await env.post("/v1/vehicles/ZOE-001/unlock", {"reservation_id": 5})
    assert status == 422
    status, answer = await env.post("/v1/vehicles/ZOE-001/unlock", {})
    assert status == 422
    assert (await env.client.get("/v1/reservations/R-bad", headers=AUTH)).status == 404
    for limit in ("\u00b2", "9" * 5000, "0", "-1"):
        r = await env.client.get("/v1/reservations", params={"limit": limit}, headers=AUTH)
        assert r.status == 400, limit


async def test_reservation_crud_conflicts_and_listing(env: Env) -> None:
    status, created = await env.put("R-a", body("ZOE-011", start=60, end=120))
    assert status == 201 and created["status"] == "active" and created["kind"] == "public"
    status, answer = await env.put("R-b", body("ZOE-011", start=90, end=150))
    assert status == 409 and answer["error"]["code"] == "reservation_conflict"
    assert (await env.put("R-b", body("ZOE-011", start=120, end=150)))[0] == 201  # back to back is fine
    status, updated = await env.put("R-a", body("ZOE-011", start=30, end=119, kind="staff"))
    assert status == 200 and updated["kind"] == "staff" and updated["created_at"] == created["created_at"]
    r = await env.client.get("/v1/reservations", params={"vehicle_id": "ZOE-011"}, headers=AUTH)
    listed = (await r.json())["reservations"]
    assert [x["reservation_id"] for x in listed] == ["R-a", "R-b"]
    r = await env.client.get("/v1/reservations", params={"from": at(125), "to": at(200)}, headers=AUTH)
    assert [x["reservation_id"] for x in (await r.json())["reservations"]] == ["R-b"]
    assert (await env.client.delete("/v1/reservations/R-a", headers=AUTH)).status == 204
    assert (await env.client.delete("/v1/reservations/R-a", headers=AUTH)).status == 204
    got = await (await env.client.get("/v1/reservations/R-a", headers=AUTH)).json()
    assert got["status"] == "cancelled"
    # a cancelled reservation no longer blocks its slot
    assert (await env.put("R-c", body("ZOE-011", start=30, end=119)))[0] == 201
    assert (await env.client.delete("/v1/reservations/R-zzz", headers=AUTH)).status == 404

    def both() -> list[dict[str, Any]] | None:
        # Written behind, one point at a time: wait for both, not for the first.
        rows = env.q("SELECT * FROM reservations WHERE cancelled = false")
        return rows if {r["reservation_id"] for r in rows} >= {"R-b", "R-c"} else None

    rows = await async_wait_for(both, what="the points of R-b and R-c")
    assert {r["station"] for r in rows} == {FLEET.vehicles["ZOE-011"].station}


async def test_idempotency_key_replays_the_first_answer_without_a_second_command(env: Env) -> None:
    assert (await env.put("R-i", body("ZOE-012")))[0] == 201
    key = {"Idempotency-Key": "k-1"}
    sent_before = env.rt.dispatcher.results.total()
    first, second = await asyncio.gather(
        env.post("/v1/vehicles/ZOE-012/unlock", {"reservation_id": "R-i"}, key),
        env.post("/v1/vehicles/ZOE-012/unlock", {"reservation_id": "R-i"}, key),
    )
    third = await env.post("/v1/vehicles/ZOE-012/unlock", {"reservation_id": "R-i"}, key)
    assert first == second == third and first[0] == 200
    assert env.rt.dispatcher.results.total() == sent_before + 1
    status, answer = await env.post("/v1/vehicles/ZOE-012/lock", {"reservation_id": "R-i"}, key)
    assert status == 422 and answer["error"]["code"] == "idempotency_key_reused"


async def test_concurrent_unlocks_of_different_cars(env: Env) -> None:
    cars = [f"ZOE-{i:03d}" for i in range(13, 23)]
    for i, car in enumerate(cars):
        assert (await env.put(f"R-c{i}", body(car)))[0] == 201
    answers = await asyncio.gather(
        *(env.post(f"/v1/vehicles/{car}/unlock", {"reservation_id": f"R-c{i}"}) for i, car in enumerate(cars))
    )
    assert [s for s, _ in answers] == [200] * len(cars)
    assert len({a["command_id"] for _, a in answers}) == len(cars)
    assert all(env.sim.doors(car)[0] is False for car in cars)


async def test_unlock_at_start_and_restart_survival(
    stack: Stack, unique: Unique, tmp_path: Path, aiohttp_client: Callable[..., Any]
) -> None:
    async with SimFleet(sim_config(stack, unique)) as sim:
        await sim.wait_ready(timeout=15)
        env = await start_env(stack, unique, tmp_path, aiohttp_client, sim)
        start_in = 1.5 / 60  # minutes
        assert (await env.put("R-s", body("KANGOO-001", start=start_in, end=60, unlock_at_start=True)))[0] == 201
        assert (await env.put("R-keep", body("KANGOO-002", start=30, end=60)))[0] == 201

        async def start_unlock() -> Any:
            got = await (await env.client.get("/v1/reservations/R-s", headers=AUTH)).json()
            return got["start_unlock"] and got["start_unlock"]["status"] != "pending" and got

        got = await async_wait_for(start_unlock, timeout=10, what="start-time unlock outcome")
        assert got["start_unlock"]["status"] == "done" and got["start_unlock"]["command_id"]
        assert sim.doors("KANGOO-001")[0] is False
        await env.client.close()  # the gateway stops (cleanup contexts run)

        # While it is down, a reservation's start passes: it must be unlocked exactly once after restart.
        store = open_sqlite(tmp_path / "gateway.sqlite3")
        b = body("KANGOO-003", start=-1, end=60)
        req = ReservationRequest(
            "KANGOO-003", "U-42", rfc3339_ms(b["starts_at"]), rfc3339_ms(b["ends_at"]), "public", True
        )
        missed = new_reservation("R-m", req, FLEET.vehicles, 1, "booking-test")
        assert await store.put_reservation(missed, 0) is None
        await store.close()

        env2 = await start_env(stack, unique, tmp_path, aiohttp_client, sim)
        await async_wait_for(lambda: sim.doors("KANGOO-003")[0] is False, timeout=10, what="unlock after restart")
        kept = await (await env2.client.get("/v1/reservations/R-keep", headers=AUTH)).json()
        assert kept["vehicle_id"] == "KANGOO-002"  # reservations survive a restart
        again = await (await env2.client.get("/v1/reservations/R-s", headers=AUTH)).json()
        assert again["start_unlock"]["command_id"] == got["start_unlock"]["command_id"]  # not sent twice
        rows = await async_wait_for(
            lambda: env2.q("SELECT * FROM commands WHERE vehicle_id = 'KANGOO-003'"), what="command row"
        )
        assert len(rows) == 1


async def test_a_gateway_prunes_the_audit_past_its_retention_at_start_under_the_lease(
    stack: Stack, unique: Unique, tmp_path: Path, aiohttp_client: Callable[..., Any]
) -> None:
    # Pruning is once-only work under the lease: on SQLite the one gateway takes it at once and prunes then.
    now = now_ms()
    store = open_sqlite(tmp_path / "gateway.sqlite3")
    for cid, age_days in (("c-old", 411), ("c-kept", 399)):
        issued = now - age_days * 86_400_000
        await store.record_command(
            CommandRecord(cid, "ZOE-009", "unlock", None, "booking", "api", issued, "done", None, 9.0)
        )
    await store.close()
    settings = gateway_settings(
        stack.broker.port, f"http://127.0.0.1:{stack.influx.port}", unique.prefix, unique.database, tmp_path
    )
    client = await aiohttp_client(init_app(settings, FLEET))

    async def pruned() -> bool:
        r = await client.get("/v1/vehicles/ZOE-009/commands", headers=AUTH)
        return [c["command_id"] for c in (await r.json())["commands"]] == ["c-kept"]

    await async_wait_for(pruned, 10, "the record past 410 days pruned, the other kept")
    # Once-only work: with several gateways on one store, only the lease holder prunes.
    lease = Parts(client.app).lease
    assert lease.held and "prune-store" in [name for name, _ in lease.jobs]


async def test_a_sqlite_store_url_keeps_the_reservations_in_that_file(
    stack: Stack, unique: Unique, tmp_path: Path, aiohttp_client: Callable[..., Any]
) -> None:
    file = tmp_path / "elsewhere" / "fleet.db"
    settings = gateway_settings(
        stack.broker.port,
        f"http://127.0.0.1:{stack.influx.port}",
        unique.prefix,
        unique.database,
        tmp_path / "state",
        store__url=f"sqlite:///{file}",
    )
    client = await aiohttp_client(init_app(settings, FLEET))
    r = await client.put("/v1/reservations/R-file", json=body("ZOE-011", start=30, end=90), headers=AUTH)
    assert r.status == 201, await r.text()
    await client.close()
    assert not (tmp_path / "state" / "gateway.sqlite3").exists()
    store = open_sqlite(file)
    try:
        kept = await store.get_reservation("R-file")
        assert kept is not None and kept.vehicle_id == "ZOE-011"
    finally:
        await store.close()


async def test_an_idempotency_key_in_flight_is_not_shared_with_another_request(env: Env) -> None:
    # ZOE-003 never answers, so the first call is still waiting when the second arrives.
    key = {"Idempotency-Key": "k-busy"}
    first = asyncio.create_task(env.post("/v1/vehicles/ZOE-003/lock", {}, key))
    await async_wait_for(lambda: env.rt.dispatcher.in_flight == 1, what="first lock in flight")
    status, answer = await env.post("/v1/vehicles/ZOE-002/lock", {}, key)
    assert status == 422 and answer["error"]["code"] == "idempotency_key_reused"
    assert (await first)[0] == 504


FRONT_DESK = "front-desk-secret-0123456789"
NIGHT_OPS = "night-ops-secret-0123456789"


async def test_the_audit_says_which_named_key_opened_which_car(
    stack: Stack, unique: Unique, tmp_path: Path, aiohttp_client: Callable[..., Any]
) -> None:
    async with SimFleet(sim_config(stack, unique)) as sim:
        await sim.wait_ready(timeout=15)
        keys = [f"front-desk:{FRONT_DESK}", f"night-ops:{NIGHT_OPS}", API_KEY]
        env = await start_env(stack, unique, tmp_path, aiohttp_client, sim, api__keys=keys)
        desk = {"Authorization": f"Bearer {FRONT_DESK}"}
        ops = {"Authorization": f"Bearer {NIGHT_OPS}"}
        c = env.client
        assert (await c.put("/v1/reservations/R-aud", json=body("ZOE-014"), headers=desk)).status == 201
        r = await c.post("/v1/vehicles/ZOE-014/unlock", json={"reservation_id": "R-aud"}, headers=desk)
        unlocked = await r.json()
        assert r.status == 200, unlocked
        r = await c.post("/v1/vehicles/ZOE-014/lock", json={}, headers=ops)
        locked = await r.json()
        assert r.status == 200, locked
        r = await c.post("/v1/vehicles/ZOE-003/lock", json={}, headers=ops)  # ZOE-003 never answers
        assert r.status == 504

        r = await c.get("/v1/vehicles/ZOE-014/commands", headers=AUTH)
        listed = (await r.json())["commands"]
        assert r.status == 200
        assert [(x["command_id"], x["action"], x["caller"], x["source"], x["result"]) for x in listed] == [
            (locked["command_id"], "lock", "night-ops", "api", "done"),
            (unlocked["command_id"], "unlock", "front-desk", "api", "done"),
        ]
        assert listed[1]["reservation_id"] == "R-aud" and listed[0]["reservation_id"] is None
        assert listed[1]["latency_ms"] > 0 and listed[1]["issued_at"].endswith("Z")
        assert FRONT_DESK not in await r.text() and NIGHT_OPS not in await r.text()
        timeout = (await (await c.get("/v1/vehicles/ZOE-003/commands", headers=AUTH)).json())["commands"]
        assert [(x["caller"], x["result"], x["reason"]) for x in timeout] == [
            ("night-ops", "timeout", "vehicle_timeout")
        ]

        # A window and a limit; newest first.
        after = listed[0]["issued_at"]
        r = await c.get("/v1/vehicles/ZOE-014/commands", params={"to": after}, headers=AUTH)
        assert [x["command_id"] for x in (await r.json())["commands"]] == [unlocked["command_id"]]
        r = await c.get("/v1/vehicles/ZOE-014/commands", params={"limit": "1"}, headers=AUTH)
        assert [x["command_id"] for x in (await r.json())["commands"]] == [locked["command_id"]]
        for bad in ({"limit": "0"}, {"from": "yesterday"}, {"from": "4484-06-03T22:00:47Z"}, {"bogus": "1"}):
            r = await c.get("/v1/vehicles/ZOE-014/commands", params=bad, headers=AUTH)
            assert r.status == 400 and (await r.json())["error"]["code"] == "bad_query", bad
        r = await c.get("/v1/vehicles/NOPE-1/commands", headers=AUTH)
        assert r.status == 404 and (await r.json())["error"]["code"] == "unknown_vehicle"

        # The `commands` measurement carries the caller too, for Grafana.
        rows = await async_wait_for(
            lambda: len(x := env.q("SELECT * FROM commands WHERE vehicle_id = 'ZOE-014'")) >= 2 and x,
            what="commands rows",
        )
        assert {(row["action"], row["caller"]) for row in rows} == {("unlock", "front-desk"), ("lock", "night-ops")}

        # The audit survives a restart.
        await c.close()
        env2 = await start_env(stack, unique, tmp_path, aiohttp_client, sim, api__keys=keys)
        r = await env2.client.get("/v1/vehicles/ZOE-014/commands", headers=ops)
        assert [x["caller"] for x in (await r.json())["commands"]] == ["night-ops", "front-desk"]


async def test_a_start_unlock_is_audited_as_the_key_that_booked_it(
    stack: Stack, unique: Unique, tmp_path: Path, aiohttp_client: Callable[..., Any]
) -> None:
    async with SimFleet(sim_config(stack, unique)) as sim:
        await sim.wait_ready(timeout=15)
        keys = [f"front-desk:{FRONT_DESK}"]
        env = await start_env(stack, unique, tmp_path, aiohttp_client, sim, api__keys=keys)
        desk = {"Authorization": f"Bearer {FRONT_DESK}"}
        data = body("KANGOO-004", start=-1, end=60, unlock_at_start=True)
        assert (await env.client.put("/v1/reservations/R-sa", json=data, headers=desk)).status == 201

        async def audited() -> Any:
            r = await env.client.get("/v1/vehicles/KANGOO-004/commands", headers=desk)
            return (await r.json())["commands"]

        (entry,) = await async_wait_for(audited, timeout=10, what="the start unlock in the audit")
        assert (entry["caller"], entry["source"], entry["result"]) == ("front-desk", "start_unlock", "done")
