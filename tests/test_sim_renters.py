"""The simulator's renters drive a day through the real gateway: book, unlock, drive, return, end.

Real Mosquitto and InfluxDB, the gateway in-process; the simulated day runs
1,800 times faster, so a morning of staff bookings passes in seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from device_sim import Intervals, SimConfig, SimFleet
from device_sim.renters import Renters
from gateway.rules.billing import month_of
from gateway.times import rfc3339_ms
from tests.conftest import Stack, Unique
from tests.helpers import API_KEY, AUTH, MASTER_KEY, async_wait_for
from tests.test_booking_integration import start_env

pytestmark = pytest.mark.integration


async def test_renters_end_their_rentals_and_fix_a_forgotten_cable(
    stack: Stack, unique: Unique, tmp_path: Path, aiohttp_client: Callable[..., Any]
) -> None:
    cfg = SimConfig(
        port=stack.broker.port, prefix=unique.prefix, master_key=MASTER_KEY, speed=1800, seed=3, start_hour=9.0,
        intervals=Intervals(battery_driving_s=300, location_driving_s=120),
    )  # fmt: skip
    async with SimFleet(cfg) as sim:
        await sim.wait_ready(timeout=15)
        env = await start_env(stack, unique, tmp_path, aiohttp_client, sim)
        renters = Renters(sim, f"http://127.0.0.1:{env.client.port}", API_KEY, forget_plug_share=0.5, seed=3)
        task = asyncio.create_task(renters.run())
        try:
            await async_wait_for(
                lambda: renters.stats.ended >= 4 and renters.stats.refused_409 >= 1,
                timeout=90,
                what=f"four rentals ended, one after a 409 ({renters.stats})",
            )
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        r = await env.client.get("/v1/trips", headers=AUTH)
        trips = [t for t in (await r.json())["trips"] if t["ended_at"]]
        assert len(trips) >= 4 and all(t["ended_by"] == "user" and not t["forced"] for t in trips)
        assert all(t["end"]["at_station"] and t["distance_km"] > 0 for t in trips), [
            (t["vehicle_id"], t["end"], t["distance_km"], t["start"]) for t in trips
        ]
        # The month's statement of these simulated bookings adds up to the cent.
        month = month_of(rfc3339_ms(trips[0]["started_at"]), "Europe/Paris")
        r = await env.client.get("/v1/reports/usage", params={"month": month}, headers=AUTH)
        report = await r.json()
        assert sum(round(u["total_eur"] * 100) for u in report["users"]) == round(
            (report["totals"]["amount_eur"] + report["totals"]["fees_eur"]) * 100
        )
        assert report["totals"]["trips"] >= len(trips) - 1  # all but one crossing midnight at a month's end
        kinds = [t["kind"] for t in trips]
        assert kinds.count("staff") > kinds.count("public")  # a Monday morning: mostly staff


async def test_staff_booking_ahead_over_the_public_moves_or_bumps_them(
    stack: Stack, unique: Unique, tmp_path: Path, aiohttp_client: Callable[..., Any]
) -> None:
    cfg = SimConfig(port=stack.broker.port, prefix=unique.prefix, master_key=MASTER_KEY, speed=60, seed=5)
    async with SimFleet(cfg) as sim:
        await sim.wait_ready(timeout=15)
        # A day's notice at 60x, as the main job sets it: 24 real minutes.
        env = await start_env(stack, unique, tmp_path, aiohttp_client, sim, booking__preempt_notice_s=1440)
        renters = Renters(sim, f"http://127.0.0.1:{env.client.port}", API_KEY, seed=5)
        async with aiohttp.ClientSession(headers=renters.headers) as http:
            sim_h = sim.clock.wall_delay(3600.0)
            for _ in range(40):
                await renters._book_ahead(http, time.time(), sim_h)
            for a in list(renters._ahead):
                await renters._staff_over(http, a, sim_h)
        s = renters.stats
        assert s.ahead >= 30  # a few land on a car already booked ahead then
        assert s.reassigned >= 1 and s.preempted >= 1, s  # ahead 12-60 simulated hours: both sides of the notice
        r = await env.client.get("/v1/events", params={"type": "reservation.reassigned"}, headers=AUTH)
        assert len((await r.json())["events"]) == s.reassigned
