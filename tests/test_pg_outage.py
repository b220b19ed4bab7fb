"""PostgreSQL stopped under a running gateway, then started again (issue 15).

While the store is down, the booking API answers 503 `store_unavailable` at
once, telemetry goes on being stored in InfluxDB (ingest does not touch the
store), and once PostgreSQL is back the same gateway, without a restart,
serves what was there before and takes new reservations.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from device_sim import Behaviour, SimConfig, SimFleet
from gateway.app import init_app
from gateway.fleet import load_fleet
from scripts import services
from scripts.postgresql import start_postgres
from tests.conftest import Stack, Unique
from tests.helpers import (
    AUTH,
    MASTER_KEY,
    REPO,
    Parts,
    async_wait_for,
    both_links_up,
    gateway_settings,
    influx_query,
    mosquitto_pub,
)
from tests.pg import Postgres
from tests.test_booking_integration import body as reservation

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FLEET = load_fleet(REPO / "config" / "fleet.yaml")


async def test_postgresql_down_and_back_under_a_running_gateway(
    stack: Stack, unique: Unique, tmp_path: Path, aiohttp_client: Callable[..., Any]
) -> None:
    pg = start_postgres(tmp_path / "postgres")  # its own: this test stops it
    try:
        url = Postgres(pg).empty()
        settings = gateway_settings(
            stack.broker.port, f"http://127.0.0.1:{stack.influx.port}", unique.prefix, unique.database,
            tmp_path / "state", store__url=url,
        )  # fmt: skip
        client = await aiohttp_client(init_app(settings, FLEET))
        r = await client.put("/v1/reservations/R-before", json=reservation(start=60, end=120), headers=AUTH)
        assert r.status == 201, await r.text()

        services.Service.stop(pg, signal.SIGINT)  # down, its data kept
        # 503 at once, each time: the pooled connections fail on use and are dropped, and once none is
        # left a request must not wait out the pool's timeout (10 s) for one that cannot be made.
        for n in range(12):  # more than the pool holds (10)
            t0 = time.monotonic()
            r = await client.put("/v1/reservations/R-during", json=reservation(start=180, end=240), headers=AUTH)
            body = await r.json()
            assert r.status == 503 and body["error"]["code"] == "store_unavailable", body
            assert time.monotonic() - t0 < 5, f"request {n + 1} answered after {time.monotonic() - t0:.1f} s"
        doc = json.dumps({"ts": int(time.time() * 1000), "soc_pct": 42.0, "range_km": 120.0, "charging": False})
        await mosquitto_pub(stack.broker.port, f"{unique.prefix}/ZOE-002/battery", doc)

        def stored() -> list[dict[str, Any]]:
            return influx_query(stack.influx.port, unique.database, "SELECT soc_pct FROM battery")

        rows = await async_wait_for(stored, 10, "telemetry stored while the store is down")
        assert rows[0]["soc_pct"] == 42.0

        pg.restart()

        async def booked() -> bool:
            r = await client.put("/v1/reservations/R-after", json=reservation(start=300, end=360), headers=AUTH)
            return bool(r.status == 201)

        await async_wait_for(booked, 15, "a reservation taken once PostgreSQL is back")
        r = await client.get("/v1/reservations/R-before", headers=AUTH)
        assert r.status == 200  # what was there before the outage is still there
        r = await client.get("/v1/reservations/R-during", headers=AUTH)
        assert r.status == 404  # refused during it, so never stored
    finally:
        pg.stop()


async def test_postgresql_killed_during_a_burst_of_unlocks_loses_no_audited_command(
    stack: Stack, unique: Unique, tmp_path: Path, aiohttp_client: Callable[..., Any]
) -> None:
    # The audit is written behind: a command the car carried out just before or while the store died is
    # answered 200 and must still be listed once PostgreSQL is back, from the records kept in memory.
    cars = [f"ZOE-{n:03d}" for n in range(1, 9)]
    pg = start_postgres(tmp_path / "postgres", crash_safe=True)
    # Half the cars ack 0.4 s late, so commands are surely under way when the store dies: their audit
    # records come after it, and only memory holds them until it is back.
    slow = {car: Behaviour.SLOW_ACK for car in cars[::2]}
    config = SimConfig(port=stack.broker.port, prefix=unique.prefix, master_key=MASTER_KEY, speed=1, seed=3,
                       start_hour=3.0, behaviours=slow, slow_ack_s=0.4)  # fmt: skip
    try:
        url = Postgres(pg).empty()
        settings = gateway_settings(
            stack.broker.port, f"http://127.0.0.1:{stack.influx.port}", unique.prefix, unique.database,
            tmp_path / "state", store__url=url, commands__ack_timeout_s=5.0,
            api__rate_limit_per_min=100_000,
        )  # fmt: skip
        async with SimFleet(config) as sim:
            await sim.wait_ready(timeout=15)
            client = await aiohttp_client(init_app(settings, FLEET))
            # Else an early unlock's 503 could be the broker's, and pass for the store's below.
            await async_wait_for(lambda: both_links_up(Parts(client.app)), 10, "both MQTT links up")
            for car in cars:
                r = await client.put(f"/v1/reservations/R-{car}", json=reservation(car, start=-6, end=54, kind="staff",
                                     user_id=f"U-{car}"), headers=AUTH)  # fmt: skip
                assert r.status == 201, await r.text()
            done: dict[str, set[str]] = {car: set() for car in cars}
            statuses: list[int] = []
            refusals: set[str] = set()  # the error codes of the 503s
            stop_at = time.monotonic() + 4.0
            killed_at = stop_at  # until it is
            done_after_kill = 0

            async def burst(car: str) -> None:
                nonlocal done_after_kill
                n = 0
                while time.monotonic() < stop_at:
                    action = ("unlock", "lock")[n % 2]
                    n += 1
                    r = await client.post(f"/v1/vehicles/{car}/{action}", json={"reservation_id": f"R-{car}"},
                                          headers=AUTH)  # fmt: skip
                    statuses.append(r.status)
                    answer = await r.json()
                    if r.status == 200 and answer["status"] == "done":
                        done[car].add(answer["command_id"])
                        done_after_kill += time.monotonic() > killed_at
                    elif r.status == 503:
                        refusals.add(answer["error"]["code"])
                        await asyncio.sleep(0.05)

            async def kill_midway() -> None:
                nonlocal killed_at
                await asyncio.sleep(1.5)
                killed_at = time.monotonic()
                # PostgreSQL's immediate shutdown: no clean exit. In a thread: the loop must go on meanwhile.
                await asyncio.to_thread(services.Service.stop, pg, signal.SIGQUIT)

            await asyncio.gather(*(burst(car) for car in cars), kill_midway())
            assert refusals == {"store_unavailable"} and done_after_kill > 0, (refusals, done_after_kill)
            pg.restart()

            missing: dict[str, set[str]] = {}

            async def all_listed() -> bool:
                for car in cars:
                    r = await client.get(f"/v1/vehicles/{car}/commands?limit=1000", headers=AUTH)
                    if r.status != 200:
                        return False
                    listed = {c["command_id"] for c in (await r.json())["commands"]}
                    if not done[car] <= listed:
                        missing[car] = done[car] - listed
                        return False
                return True

            try:
                await async_wait_for(all_listed, 20, "every command answered done listed once PostgreSQL is back")
            except AssertionError:
                raise AssertionError(f"missing {missing}, of {sum(map(len, done.values()))}") from None
            assert sum(map(len, done.values())) >= 16
    finally:
        pg.stop()
