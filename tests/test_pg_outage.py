"""PostgreSQL stopped under a running gateway, then started again (issue 15).

While the store is down, the booking API answers 503 `store_unavailable` at
once, telemetry goes on being stored in InfluxDB (ingest does not touch the
store), and once PostgreSQL is back the same gateway, without a restart,
serves what was there before and takes new reservations.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from gateway.app import init_app
from gateway.fleet import load_fleet
from scripts import services
from tests.conftest import Stack, Unique
from tests.helpers import AUTH, REPO, async_wait_for, gateway_settings, influx_query, mosquitto_pub

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FLEET = load_fleet(REPO / "config" / "fleet.yaml")


def _booking(start_h: float) -> dict[str, Any]:
    start = datetime.now(UTC) + timedelta(hours=start_h)
    return {"vehicle_id": "ZOE-001", "user_id": "U-1", "kind": "public", "starts_at": start.isoformat(),
            "ends_at": (start + timedelta(hours=1)).isoformat()}  # fmt: skip


async def test_postgresql_down_and_back_under_a_running_gateway(
    stack: Stack, unique: Unique, tmp_path: Path, aiohttp_client: Callable[..., Any]
) -> None:
    pg = services.start_postgres(tmp_path / "postgres")  # its own: this test stops it
    try:
        with psycopg.connect(pg.url, autocommit=True) as conn:
            conn.execute("CREATE DATABASE fleet")
        settings = gateway_settings(
            stack.broker.port, f"http://127.0.0.1:{stack.influx.port}", unique.prefix, unique.database,
            tmp_path / "state", store__url=pg.url_for("fleet"),
        )  # fmt: skip
        client = await aiohttp_client(init_app(settings, FLEET))
        r = await client.put("/v1/reservations/R-before", json=_booking(1), headers=AUTH)
        assert r.status == 201, await r.text()

        services.Service.stop(pg, signal.SIGINT)  # down, its data kept
        t0 = time.monotonic()
        r = await client.put("/v1/reservations/R-during", json=_booking(3), headers=AUTH)
        body = await r.json()
        assert r.status == 503 and body["error"]["code"] == "store_unavailable", body
        assert time.monotonic() - t0 < 5
        doc = json.dumps({"ts": int(time.time() * 1000), "soc_pct": 42.0, "range_km": 120.0, "charging": False})
        await mosquitto_pub(stack.broker.port, f"{unique.prefix}/ZOE-002/battery", doc)

        def stored() -> list[dict[str, Any]]:
            return influx_query(stack.influx.port, unique.database, "SELECT soc_pct FROM battery")

        rows = await async_wait_for(stored, 10, "telemetry stored while the store is down")
        assert rows[0]["soc_pct"] == 42.0

        pg.restart()

        async def booked() -> bool:
            r = await client.put("/v1/reservations/R-after", json=_booking(5), headers=AUTH)
            return bool(r.status == 201)

        await async_wait_for(booked, 15, "a reservation taken once PostgreSQL is back")
        r = await client.get("/v1/reservations/R-before", headers=AUTH)
        assert r.status == 200  # what was there before the outage is still there
        r = await client.get("/v1/reservations/R-during", headers=AUTH)
        assert r.status == 404  # refused during it, so never stored
    finally:
        pg.stop()
