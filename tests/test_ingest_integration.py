"""Ingest end to end: mosquitto_pub -> real Mosquitto -> gateway -> real InfluxDB, read back with InfluxQL.

Both sinks are exercised: v1 writes to InfluxDB 1.6's /write; v2 writes
through influxdb-client to /api/v2/write, which the test-only nginx proxy
maps onto /write (Debian's InfluxDB 1.6 has no v2 API).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from gateway.app import init_app
from gateway.fleet import load_fleet
from tests.conftest import Stack, Unique
from tests.helpers import (
    AUTH,
    REPO,
    Parts,
    async_wait_for,
    both_links_up,
    gateway_settings,
    influx_query,
    mosquitto_pub,
)

pytestmark = pytest.mark.integration

FLEET = load_fleet(REPO / "config" / "fleet.yaml")

# Yesterday at 09:00:00.123Z, whatever the date of the run: the gateway refuses readings older than a week.
T0 = (int(time.time()) // 86_400 - 1) * 86_400_000 + 9 * 3_600_000 + 123
DAY = datetime.fromtimestamp(T0 / 1000, UTC).date().isoformat()
# The contract's three forms of ts: RFC 3339 with milliseconds, epoch milliseconds, RFC 3339 in whole seconds.
BATTERY = f'{{"ts": "{DAY}T09:00:00.123Z", "soc_pct": 81.5, "range_km": 212, "charging": false, "plugged": true}}'
LOCATION = f'{{"ts": {T0}, "lat": 48.4306, "lon": 0.0931, "speed_kmh": 0, "heading_deg": 0, "odometer_km": 18231.4}}'
DOORS = f'{{"ts": "{DAY}T09:00:01Z", "locked": true, "closed": true}}'


class Gw:
    def __init__(self, client: TestClient[Any, Any], stack: Stack, unique: Unique) -> None:
        self.client = client
        self.stack = stack
        self.unique = unique
        self.rt = Parts(client.app)

    def topic(self, vehicle: str, kind: str) -> str:
        return f"{self.unique.prefix}/{vehicle}/{kind}"

    async def pub(self, vehicle: str, kind: str, *payloads: str | bytes, qos: int = 1) -> None:
        await mosquitto_pub(self.stack.broker.port, self.topic(vehicle, kind), *payloads, qos=qos)

    def q(self, query: str) -> list[dict[str, Any]]:
        return influx_query(self.stack.influx.port, self.unique.database, query)

    async def rows(self, query: str, n: int) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = await async_wait_for(
            lambda: (r := self.q(query)) and len(r) >= n and r, what=f"{n} rows of {query}"
        )
        return rows


@pytest.fixture(params=[1, 2], ids=["influx-v1", "influx-v2"])
async def gw(
    request: pytest.FixtureRequest,
    stack: Stack,
    unique: Unique,
    tmp_path: Path,
    aiohttp_client: Callable[..., Any],
) -> AsyncIterator[Gw]:
    version = request.param
    port = stack.influx.port if version == 1 else stack.v2proxy.port
    url = f"http://127.0.0.1:{port}"
    settings = gateway_settings(
        stack.broker.port, url, unique.prefix, unique.database, tmp_path, influx__api_version=version
    )
    if version == 2:  # the v2 API has no CREATE DATABASE; the bucket exists beforehand
        from scripts.services import create_database

        create_database(stack.influx.port, unique.database)
    client = await aiohttp_client(init_app(settings, FLEET))
    g = Gw(client, stack, unique)
    # Both links: /healthz says "connected" only once the command link is up too.
    await async_wait_for(lambda: both_links_up(g.rt), what="both links connected")
    yield g


async def test_contract_examples_land_with_schema(gw: Gw) -> None:
    await gw.pub("ZOE-001", "battery", BATTERY)
    await gw.pub("ZOE-001", "location", LOCATION)
    await gw.pub("ZOE-001", "doors", DOORS)
    await gw.pub("ZOE-001", "status", '{"online": true, "firmware": "2.4.1"}')

    (b,) = await gw.rows("SELECT * FROM battery", 1)
    assert b["time"] == T0
    assert (b["vehicle_id"], b["model"]) == ("ZOE-001", "zoe")
    assert (b["soc_pct"], b["range_km"], b["charging"], b["plugged"]) == (81.5, 212, False, True)
    assert "temp_c" not in b  # only fields present in a message are written

    (loc,) = await gw.rows("SELECT * FROM location", 1)
    assert loc["time"] == T0
    assert (loc["lat"], loc["lon"], loc["odometer_km"], loc["speed_kmh"]) == (48.4306, 0.0931, 18231.4, 0)

    (d,) = await gw.rows("SELECT * FROM doors", 1)
    assert (d["time"], d["locked"], d["closed"]) == (T0 + 877, True, True)

    (s,) = await gw.rows("SELECT * FROM status", 1)
    assert s["online"] is True and s["vehicle_id"] == "ZOE-001"
    assert "firmware" not in s  # kept in the latest state, not a contract field

    tags = gw.q('SHOW TAG KEYS FROM "battery"')
    assert {r["tagKey"] for r in tags} == {"vehicle_id", "model"}


async def test_each_kind_of_invalid_message_is_rejected_with_its_reason(gw: Gw) -> None:
    cases: list[tuple[str, str, str | bytes, str]] = [
        ("ZOE-002", "battery", "{not json", "bad_json"),
        ("ZOE-002", "battery", b'{"soc_pct": "\xff\xfe"}', "bad_encoding"),
        ("ZOE-002", "battery", "[1, 2]", "not_object"),
        ("ZOE-002", "battery", '{"range_km": 10}', "missing_field"),
        ("ZOE-002", "battery", '{"soc_pct": "81"}', "bad_type"),
        ("ZOE-002", "battery", '{"soc_pct": 101}', "out_of_range"),
        ("ZOE-002", "location", '{"lat": 91, "lon": 0}', "out_of_range"),
        ("NOPE-999", "doors", '{"locked": true}', "unknown_vehicle"),
        ("ZOE-002", "doors", '{"locked": true, "vehicle_id": "ZOE-003"}', "vehicle_mismatch"),
        ("ZOE-002", "doors", '{"locked": true, "pad": "' + "x" * 17000 + '"}', "oversized"),
        ("ZOE-002", "doors", '{"locked": true, "ts": "2099-01-01T00:00:00Z"}', "clock_skew"),
        ("ZOE-002", "doors", '{"locked": true, "ts": "2001-01-01T00:00:00Z"}', "too_old"),
        ("ZOE-002", "doors", '{"locked": true, "ts": "yesterday"}', "bad_timestamp"),
        ("ZOE-002", "wheels", '{"pressure": 2.4}', "unknown_topic"),
    ]
    for vehicle, kind, payload, _ in cases:
        await gw.pub(vehicle, kind, payload)
    # A valid message after all of them still goes through.
    await gw.pub("ZOE-002", "battery", '{"soc_pct": 50}')
    await gw.rows("SELECT * FROM battery", 1)

    rows = await gw.rows("SELECT * FROM rejected", len(cases))
    got = sorted((r["reason"], r["kind"]) for r in rows)
    expected = sorted((reason, kind if kind != "wheels" else "unknown") for _, kind, _, reason in cases)
    assert got == expected
    by_reason = {r["reason"]: r for r in rows}
    assert by_reason["unknown_vehicle"]["vehicle_id"] == "NOPE-999"
    assert by_reason["bad_json"]["excerpt"] == "{not json"
    assert len(by_reason["oversized"]["excerpt"]) == 200
    assert by_reason["out_of_range"]["topic"].startswith(gw.unique.prefix)
    stats = gw.rt.ingest.stats
    assert stats.rejected == len(cases) and stats.accepted == 1
    assert sum(stats.rejected_by.values()) == len(cases)


async def test_vehicles_api_serves_latest_state_and_needs_a_key(gw: Gw) -> None:
    await gw.pub("KANGOO-001", "battery", f'{{"soc_pct": 40, "ts": {T0}}}')
    await gw.pub("KANGOO-001", "battery", f'{{"soc_pct": 55, "ts": {T0 + 100_000}}}')
    # An older reading replayed later must not move the state backwards.
    await gw.pub("KANGOO-001", "battery", f'{{"soc_pct": 10, "ts": {T0 - 100_000}}}')
    await gw.pub("KANGOO-001", "status", '{"online": true}')
    await gw.rows("SELECT * FROM battery", 3)

    r = await gw.client.get("/v1/vehicles")
    assert r.status == 401
    assert (await r.json())["error"]["code"] == "unauthorized"

    r = await gw.client.get("/v1/vehicles", headers=AUTH)
    assert r.status == 200
    vehicles = (await r.json())["vehicles"]
    assert len(vehicles) == 29
    k = next(v for v in vehicles if v["vehicle_id"] == "KANGOO-001")
    assert k["battery"]["soc_pct"] == 55 and k["online"] is True and k["last_seen"]
    assert k["model"] == "kangoo" and k["station"]["id"] == "alencon-cd61"

    r = await gw.client.get("/v1/vehicles/NOPE-1", headers=AUTH)
    assert r.status == 404 and (await r.json())["error"]["code"] == "unknown_vehicle"


async def test_health_metrics_and_self_report(gw: Gw) -> None:
    await gw.pub("ZOE-004", "battery", '{"soc_pct": 70}', '{"soc_pct": 900}')
    await gw.rows("SELECT * FROM rejected", 1)
    r = await gw.client.get("/healthz")
    body = await r.json()
    assert r.status == 200 and body["status"] == "ok" and body["broker"] == "connected"
    r = await gw.client.get("/metrics")
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = await r.text()
    assert "gateway_messages_received_total 2.0" in text
    assert 'gateway_messages_rejected_total{kind="battery",reason="out_of_range"} 1.0' in text
    assert "gateway_write_duration_seconds_count" in text

    from gateway.metrics import self_report_line

    gw.rt.journal.append(self_report_line(gw.rt.monitor.snapshot(), "test", T0))
    (row,) = await gw.rows("SELECT * FROM gateway", 1)
    assert row["instance"] == "test" and row["received"] == 2 and row["rejected"] == 1


async def test_many_messages_qos0_and_qos1_all_stored(gw: Gw) -> None:
    payloads = [orjson.dumps({"soc_pct": i % 100, "ts": T0 + i}).decode() for i in range(2000)]
    await gw.pub("ZOE-005", "battery", *payloads[:1000], qos=1)
    await gw.pub("ZOE-005", "battery", *payloads[1000:], qos=0)
    await async_wait_for(
        lambda: (r := gw.q("SELECT count(soc_pct) FROM battery")) and r[0]["count"] == 2000,
        what="2000 points in InfluxDB",
    )


async def test_latest_state_survives_a_restart(
    stack: Stack, unique: Unique, tmp_path: Path, aiohttp_client: Callable[..., Any]
) -> None:
    url = f"http://127.0.0.1:{stack.influx.port}"
    settings = gateway_settings(stack.broker.port, url, unique.prefix, unique.database, tmp_path)
    first = await aiohttp_client(init_app(settings, FLEET))
    await async_wait_for(lambda: both_links_up(Parts(first.app)), what="connected")
    await mosquitto_pub(stack.broker.port, f"{unique.prefix}/ZOE-009/location", '{"lat": 48.74, "lon": -0.02}')
    await async_wait_for(lambda: Parts(first.app).state.reporting_count() == 1, what="location received")
    await first.close()  # shutdown saves the state

    second = await aiohttp_client(init_app(settings, FLEET))
    r = await second.get("/v1/vehicles/ZOE-009", headers=AUTH)
    car = await r.json()
    assert car["location"]["lat"] == 48.74 and car["last_seen"] is not None


async def test_two_gateways_split_a_fleet_with_a_shared_subscription(
    stack: Stack, unique: Unique, tmp_path: Path, aiohttp_client: Callable[..., Any]
) -> None:
    url = f"http://127.0.0.1:{stack.influx.port}"
    clients = []
    for name in ("a", "b"):
        settings = gateway_settings(
            stack.broker.port,
            url,
            unique.prefix,
            unique.database,
            tmp_path / name,
            mqtt__shared_group="gw",
            mqtt__client_id=f"{unique.database}-{name}",
        )
        clients.append(await aiohttp_client(init_app(settings, FLEET)))
    runtimes = [Parts(c.app) for c in clients]
    await async_wait_for(lambda: all(both_links_up(rt) for rt in runtimes), what="both connected")
    payloads = [orjson.dumps({"soc_pct": 50, "ts": T0 + i}).decode() for i in range(2000)]
    for car in ("ZOE-001", "ZOE-002", "ZOE-003", "ZOE-004"):
        await mosquitto_pub(stack.broker.port, f"{unique.prefix}/{car}/battery", *payloads[:500])
    await async_wait_for(
        lambda: (
            (r := influx_query(stack.influx.port, unique.database, "SELECT count(soc_pct) FROM battery"))
            and r[0]["count"] == 2000
        ),
        what="2000 points stored by the pair",
    )
    received = [rt.ingest.stats.received for rt in runtimes]
    assert sum(received) == 2000 and min(received) > 0, received


class BrokenSink:
    """A sink with a bug: it raises what no sink should."""

    async def write(self, batch: bytes) -> None:
        raise RuntimeError("a bug in a sink")

    async def check(self, timeout_s: float) -> None:
        return None

    async def close(self) -> None:
        return None


async def test_a_background_task_that_dies_is_logged_and_shown_in_healthz(
    stack: Stack, unique: Unique, tmp_path: Path, aiohttp_client: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    url = f"http://127.0.0.1:{stack.influx.port}"
    settings = gateway_settings(stack.broker.port, url, unique.prefix, unique.database, tmp_path)
    client = await aiohttp_client(init_app(settings, FLEET, sink=BrokenSink()))
    rt = Parts(client.app)
    await async_wait_for(lambda: both_links_up(rt), what="connected")
    await mosquitto_pub(stack.broker.port, f"{unique.prefix}/ZOE-001/battery", '{"soc_pct": 50}')
    await async_wait_for(lambda: "influx-writer" in rt.supervisor.dead, what="the writer's death noticed")
    r = await client.get("/healthz")
    body = await r.json()
    assert r.status == 503 and "a bug in a sink" in body["degraded"]["task influx-writer"]
    assert "background task influx-writer stopped" in caplog.text


async def test_a_retained_will_sets_online_but_is_not_news(
    stack: Stack, unique: Unique, tmp_path: Path, aiohttp_client: Callable[..., Any]
) -> None:
    proc = await asyncio.create_subprocess_exec(
        "mosquitto_pub", "-p", str(stack.broker.port), "-q", "1", "-r",
        "-t", f"{unique.prefix}/ZOE-007/status", "-m", '{"online": false}',
    )  # fmt: skip
    assert await proc.wait() == 0
    url = f"http://127.0.0.1:{stack.influx.port}"
    settings = gateway_settings(stack.broker.port, url, unique.prefix, unique.database, tmp_path)
    client = await aiohttp_client(init_app(settings, FLEET))
    rt = Parts(client.app)
    await async_wait_for(lambda: rt.ingest.stats.accepted == 1, what="the retained status delivered")
    car = await (await client.get("/v1/vehicles/ZOE-007", headers=AUTH)).json()
    assert car["online"] is False and car["last_seen"] is None  # known offline, not "seen just now"
    await mosquitto_pub(stack.broker.port, f"{unique.prefix}/ZOE-007/battery", '{"soc_pct": 50}')
    await async_wait_for(lambda: influx_query(stack.influx.port, unique.database, "SELECT * FROM battery"), what="row")
    assert influx_query(stack.influx.port, unique.database, "SELECT * FROM status") == []
