"""Grafana provisioning and every dashboard query, run against real data.

The static half checks what Grafana would refuse or silently ignore: the
provisioning YAML, the provider's path, data source uids, raw InfluxQL on
every target, variables that exist. The integration half runs a simulated
fleet through an in-process gateway into the real InfluxDB (plus a few
crafted messages for the edge cases the panels exist for: a car under 20 %,
a silent car, invalid messages, a command, reservations), then runs every
panel query with Grafana's macros substituted and expects at least one row.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.http.routes import setup_routes
from tests.conftest import Stack, Unique
from tests.helpers import AUTH, MASTER_KEY, REPO, Parts, async_wait_for, gateway_settings, influx_query, mosquitto_pub

DASHBOARDS = REPO / "dashboards"
JSON_DIR = DASHBOARDS / "json"
DATASOURCE_UID = "fleet-influxdb"
# Where docker-compose.yml mounts dashboards/json inside the grafana container.
CONTAINER_JSON_DIR = "/etc/grafana/dashboards"


def _routes() -> set[tuple[str, str]]:
    app = web.Application()
    setup_routes(app)
    return {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource is not None}


ROUTES = _routes()
HAS_RESERVATIONS = any(m == "PUT" and p.startswith("/v1/reservations/") for m, p in ROUTES)
HAS_UNLOCK_ROUTE = any(m == "POST" and p.startswith("/v1/vehicles/") and p.endswith("/unlock") for m, p in ROUTES)
NO_RESERVATIONS = "the reservations API (PUT /v1/reservations/{id}) is not registered in gateway/routes.py yet"


def load_dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text(encoding="utf-8")) for p in sorted(JSON_DIR.glob("*.json"))}


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in dashboard["panels"]:
        if p.get("type") == "row":
            yield from p.get("panels", [])
        else:
            yield p


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str
    panel: str
    ref: str
    query: str
    interval: str

    @property
    def uses_reservations(self) -> bool:
        return bool(re.search(r'FROM\s+"?reservations"?', self.query))

    def __str__(self) -> str:
        return f"{self.dashboard} / {self.panel} / {self.ref}"


def all_queries() -> list[PanelQuery]:
    out = []
    for d in load_dashboards().values():
        for p in panels(d):
            for t in p.get("targets", []):
                out.append(PanelQuery(d["title"], p["title"], t["refId"], t.get("query", ""), p.get("interval", "")))
    return out


# ---- Grafana's macro substitution -----------------------------------------------------

_VAR = re.compile(r"\$(?:\{(\w+)(?::[^}]*)?\}|(\w+))")
_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def interval_ms(text: str) -> int:
    m = re.fullmatch(r"(\d+)(ms|s|m|h|d)", text)
    if not m:
        raise ValueError(f"not a Grafana interval: {text!r}")
    return int(m.group(1)) * _UNITS_MS[m.group(2)]


def render(query: str, *, start_ms: int, end_ms: int, interval: str, variables: dict[str, str]) -> str:
    """The query as Grafana's InfluxQL data source sends it: macros and dashboard variables substituted.

    An unknown ``$name`` is an error, as it would be a broken panel in Grafana.
    """
    time_filter = f"time >= {start_ms}ms and time <= {end_ms}ms"
    values = {
        "timeFilter": time_filter,
        "__timeFilter": time_filter,
        "__interval": interval,
        "interval": interval,
        "__interval_ms": str(interval_ms(interval)),
        "__from": str(start_ms),
        "__to": str(end_ms),
        "__range_s": str((end_ms - start_ms) // 1000),
        **variables,
    }

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise KeyError(f"unknown variable ${name}")
        return values[name]

    return _VAR.sub(sub, query)


def test_render_substitutes_macros_and_variables() -> None:
    q = 'SELECT mean("x") FROM "m" WHERE "vehicle_id" =~ /^$vehicle_id$/ AND $timeFilter GROUP BY time($__interval)'
    out = render(q, start_ms=1000, end_ms=2000, interval="10s", variables={"vehicle_id": "ZOE-001"})
    assert out == (
        'SELECT mean("x") FROM "m" WHERE "vehicle_id" =~ /^ZOE-001$/ AND time >= 1000ms and time <= 2000ms '
        "GROUP BY time(10s)"
    )
    assert render("${__interval_ms} $__interval_ms", start_ms=0, end_ms=0, interval="1m", variables={}) == "60000 60000"
    with pytest.raises(KeyError, match="nope"):
        render("$nope", start_ms=0, end_ms=0, interval="1m", variables={})


# ---- static checks ---------------------------------------------------------------------


def test_datasource_provisioning_is_influxql_with_a_fixed_uid() -> None:
    files = sorted((DASHBOARDS / "datasources").glob("*.yaml"))
    assert files, "no data source provisioning file in dashboards/datasources/"
    sources = [ds for f in files for ds in yaml.safe_load(f.read_text(encoding="utf-8"))["datasources"]]
    (ds,) = [ds for ds in sources if ds["uid"] == DATASOURCE_UID]
    assert ds["type"] == "influxdb" and ds["access"] == "proxy"
    assert ds["jsonData"]["version"] == "InfluxQL"
    assert ds["jsonData"]["dbName"] and ds["url"]
    assert "password" in ds.get("secureJsonData", {}), "the InfluxDB credential belongs in secureJsonData"


def test_dashboard_provider_points_at_the_json_files() -> None:
    files = sorted((DASHBOARDS / "dashboards").glob("*.yaml"))
    assert files, "no dashboard provider in dashboards/dashboards/"
    providers = [p for f in files for p in yaml.safe_load(f.read_text(encoding="utf-8"))["providers"]]
    assert [p["options"]["path"] for p in providers] == [CONTAINER_JSON_DIR]
    assert all(p["type"] == "file" for p in providers)
    assert len(load_dashboards()) >= 4


def test_every_panel_has_raw_influxql_on_the_provisioned_datasource() -> None:
    problems = []
    uids = set()
    for name, d in load_dashboards().items():
        assert d["uid"] not in uids, f"{name}: duplicate dashboard uid {d['uid']}"
        uids.add(d["uid"])
        defined = {v["name"] for v in d.get("templating", {}).get("list", [])}
        ids = [p["id"] for p in panels(d)]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        for p in panels(d):
            where = f"{d['title']} / {p['title']}"
            if not p.get("targets"):
                problems.append(f"{where}: no query")
            if p.get("datasource", {}).get("uid") != DATASOURCE_UID:
                problems.append(f"{where}: panel data source is not {DATASOURCE_UID}")
            for t in p.get("targets", []):
                if t.get("rawQuery") is not True or not t.get("query", "").strip():
                    problems.append(f"{where} / {t.get('refId')}: not a raw InfluxQL query")
                if t.get("datasource", {}).get("uid") != DATASOURCE_UID:
                    problems.append(f"{where} / {t.get('refId')}: target data source is not {DATASOURCE_UID}")
                used = {a or b for a, b in _VAR.findall(t.get("query", ""))}
                undefined = {u for u in used if not u.startswith("__") and u not in {"timeFilter", "interval"}}
                if undefined - defined:
                    problems.append(f"{where}: uses undefined variable(s) {sorted(undefined - defined)}")
            if p.get("interval"):
                interval_ms(p["interval"])
    assert not problems, "\n".join(problems)


def test_the_issue_s_panels_exist() -> None:
    titles = {d["title"]: {p["title"] for p in panels(d)} for d in load_dashboards().values()}
    assert {"Fleet overview", "Vehicle detail", "Gateway health", "Usage"} <= set(titles)
    types = {d["title"]: {p["type"] for p in panels(d)} for d in load_dashboards().values()}
    assert "geomap" in types["Fleet overview"] and "geomap" in types["Vehicle detail"]
    vehicle = next(d for d in load_dashboards().values() if d["title"] == "Vehicle detail")
    assert [v["name"] for v in vehicle["templating"]["list"]] == ["vehicle_id"]
    assert {"Cars under 20 %", "Silent for more than 15 minutes"} <= titles["Fleet overview"]
    assert {"Unlock outcomes", "Unlock latency percentiles", "Queue depth"} <= titles["Gateway health"]


# ---- every query against real data -----------------------------------------------------

VEHICLE = "ZOE-001"  # the car the vehicle dashboard is tested with: it gets an unlock command
SIM_CARS = 25  # the first 25 of config/fleet.yaml; the last four get crafted messages
LOW, FRESH, SILENT = "ZOE-022", "ZOE-023", "KANGOO-006"


@dataclass
class Populated:
    database: str
    start_ms: int
    reservations: bool


async def _populate(stack: Stack, unique: Unique, state_dir: Path) -> bool:
    from device_sim import Fault, Intervals, SimConfig, SimFleet
    from gateway.app import init_app
    from gateway.fleet import load_fleet
    from gateway.metrics import self_report_line

    fleet = load_fleet(REPO / "config" / "fleet.yaml")
    settings = gateway_settings(stack.broker.port, f"http://127.0.0.1:{stack.influx.port}", unique.prefix,
                                unique.database, state_dir)  # fmt: skip

    def q(text: str) -> list[dict[str, Any]]:
        return influx_query(stack.influx.port, unique.database, text)

    def now_ms() -> int:
        return int(time.time() * 1000)

    async with TestClient(TestServer(init_app(settings, fleet))) as client:
        rt = Parts(client.app)
        await async_wait_for(lambda: rt.link.connected, what="the gateway connected to the broker")
        first_report = self_report_line(rt.monitor.snapshot(), "test", now_ms() - 20_000)

        cfg = SimConfig(
            host="127.0.0.1", port=stack.broker.port, prefix=unique.prefix, fleet=fleet, vehicles=SIM_CARS,
            speed=600, seed=7, master_key=MASTER_KEY,
            intervals=Intervals(battery_parked_s=120, location_parked_s=600, doors_s=600),
        )  # fmt: skip
        async with SimFleet(cfg) as sim:
            await sim.wait_ready(timeout=20)
            await sim.inject(Fault.MALFORMED, ["ZOE-002"])
            await sim.inject(Fault.OUT_OF_RANGE, ["ZOE-003"])
            if HAS_UNLOCK_ROUTE and HAS_RESERVATIONS:
                await _reserve(client, "R-DASH-UNLOCK", VEHICLE, "staff", minutes_ago=5)
                r = await client.post(f"/v1/vehicles/{VEHICLE}/unlock", json={"reservation_id": "R-DASH-UNLOCK"},
                                      headers=AUTH)  # fmt: skip
                assert r.status == 200, await r.text()
            else:
                outcome = await rt.dispatcher.send(VEHICLE, "unlock", "R-DASH-UNLOCK", "dashboards-test")
                assert outcome.result == "done", outcome
            # Two rentals taken and ended, for the trip panels (forced: the cars are wherever they drove).
            for rid, vid, kind in (("R-DASH-T0", "ZOE-004", "staff"), ("R-DASH-T1", "ZOE-011", "public")):
                await _reserve(client, rid, vid, kind, minutes_ago=50)
                r = await client.post(f"/v1/vehicles/{vid}/unlock", json={"reservation_id": rid}, headers=AUTH)
                assert r.status == 200, await r.text()
                r = await client.post(f"/v1/reservations/{rid}/end", json={"force": True}, headers=AUTH)
                assert r.status == 200, await r.text()
            # Someone must drive for the route, speed and hours-driven panels.
            await async_wait_for(
                lambda: q('SELECT count("speed_kmh") FROM "location" WHERE "speed_kmh" > 0'),
                timeout=30,
                what="a simulated car driving (location with speed_kmh > 0)",
            )

        # Crafted edge cases: a car under 20 %, one heard from just now, one silent for half an hour.
        def pub(vid: str, kind: str, doc: dict[str, Any]) -> Any:
            return mosquitto_pub(stack.broker.port, f"{unique.prefix}/{vid}/{kind}", json.dumps(doc))

        t = now_ms()
        await pub(LOW, "battery", {"ts": t, "soc_pct": 12.5, "range_km": 30, "charging": False, "plugged": False})
        await pub(FRESH, "status", {"ts": t, "online": True})
        await pub(FRESH, "battery", {"ts": t, "soc_pct": 64, "range_km": 190, "charging": True, "plugged": True})
        await pub(FRESH, "doors", {"ts": t, "locked": False, "closed": True})
        old = t - 30 * 60_000
        await pub(SILENT, "status", {"ts": old, "online": False})
        await pub(SILENT, "battery", {"ts": old, "soc_pct": 70, "range_km": 150})
        await pub(SILENT, "location", {"ts": old, "lat": 48.7647, "lon": 0.6283, "speed_kmh": 0})
        await mosquitto_pub(stack.broker.port, f"{unique.prefix}/NOPE-999/battery", '{"soc_pct": 50}')
        await mosquitto_pub(stack.broker.port, f"{unique.prefix}/{LOW}/doors", '{"locked": "yes"}')

        if HAS_RESERVATIONS:
            for i, (vid, kind) in enumerate([("ZOE-004", "staff"), ("ZOE-010", "public"), ("ZOE-017", "public")]):
                await _reserve(client, f"R-DASH-{i}", vid, kind, minutes_ago=30)
            await _reserve(client, "R-DASH-CANCEL", "ZOE-012", "public", minutes_ago=20)
            r = await client.delete("/v1/reservations/R-DASH-CANCEL", headers=AUTH)
            assert r.status == 204, await r.text()

        await async_wait_for(lambda: q(f"SELECT * FROM \"battery\" WHERE \"vehicle_id\" = '{SILENT}'"),
                             what="the crafted messages in InfluxDB")  # fmt: skip
        await async_wait_for(lambda: len(q('SELECT * FROM "rejected"')) >= 4, what="4 rejected messages")
        rt.journal.append(first_report)
        rt.journal.append(self_report_line(rt.monitor.snapshot(), "test", now_ms()))
        await async_wait_for(lambda: len(q('SELECT * FROM "gateway"')) >= 2, what="2 gateway self-reports")
        await async_wait_for(lambda: q('SELECT * FROM "commands"'), what="the unlock in InfluxDB")
        if HAS_RESERVATIONS:
            await async_wait_for(lambda: len(q('SELECT * FROM "reservations"')) >= 4, what="the reservations")
            await async_wait_for(lambda: len(q('SELECT * FROM "trips"')) >= 2, what="the trips")
    return HAS_RESERVATIONS


async def _reserve(client: TestClient[Any, Any], rid: str, vid: str, kind: str, minutes_ago: float) -> None:
    from datetime import UTC, datetime, timedelta

    start = datetime.now(UTC) - timedelta(minutes=minutes_ago)
    body = {
        "vehicle_id": vid,
        "user_id": f"u-{uuid.uuid4().hex[:6]}",
        "starts_at": start.isoformat(timespec="milliseconds"),
        "ends_at": (start + timedelta(hours=2)).isoformat(timespec="milliseconds"),
        "kind": kind,
        "unlock_at_start": False,
    }
    r = await client.put(f"/v1/reservations/{rid}", json=body, headers=AUTH)
    assert r.status in (200, 201), f"PUT /v1/reservations/{rid}: {r.status} {await r.text()}"


@pytest.fixture(scope="module")
def populated(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Populated:
    """One simulated fleet run for every panel test of this module (it takes a few seconds)."""
    tag = uuid.uuid4().hex[:10]
    unique = Unique(prefix=f"t{tag}/fleet", database=f"t_{tag}")
    start_ms = int(time.time() * 1000) - 6 * 3600 * 1000
    reservations = asyncio.run(_populate(stack, unique, tmp_path_factory.mktemp("dash-state")))
    return Populated(unique.database, start_ms, reservations)


def _cases() -> list[Any]:
    out = []
    for pq in all_queries():
        marks = [pytest.mark.skipif(not HAS_RESERVATIONS, reason=NO_RESERVATIONS)] if pq.uses_reservations else []
        out.append(pytest.param(pq, id=str(pq), marks=marks))
    return out


@pytest.mark.integration
@pytest.mark.parametrize("pq", _cases())
def test_panel_query_returns_data(pq: PanelQuery, populated: Populated, stack: Stack) -> None:
    variables = {"vehicle_id": VEHICLE}
    query = render(pq.query, start_ms=populated.start_ms, end_ms=int(time.time() * 1000) + 1000,
                   interval=pq.interval or "10s", variables=variables)  # fmt: skip
    try:
        rows = influx_query(stack.influx.port, populated.database, query)
    except AssertionError as e:
        pytest.fail(f"{pq}: the query fails: {e}")
    assert rows, f"{pq}: no data for\n  {query}"
    values = [v for r in rows for k, v in r.items() if k not in ("time", "name") and v is not None]
    assert values, f"{pq}: only empty rows for\n  {query}"


@pytest.mark.integration
def test_vehicle_variable_lists_the_cars(populated: Populated, stack: Stack) -> None:
    (vehicle,) = [d for d in load_dashboards().values() if d["title"] == "Vehicle detail"]
    (var,) = vehicle["templating"]["list"]
    rows = influx_query(stack.influx.port, populated.database, var["query"])
    assert {r["value"] for r in rows} >= {VEHICLE, LOW, SILENT}
