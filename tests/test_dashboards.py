"""Grafana provisioning and every dashboard query, run against real data.

The static half checks what Grafana would refuse or silently ignore: the
provisioning YAML, the provider's path, data source uids, raw InfluxQL on
every target and annotation, variables that exist. The integration half runs
a simulated fleet through an in-process gateway into the real InfluxDB (plus a
few crafted messages for the edge cases the panels exist for: a car under 20 %,
a silent car, invalid messages, a command, reservations, one alert left open
and one opened then resolved), then runs every panel and annotation query with
Grafana's macros substituted and expects at least one row.
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


def annotation_queries(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """The dashboard's annotation queries on the InfluxDB data source (Grafana's built-in one has no query)."""
    found = dashboard.get("annotations", {}).get("list", [])
    return [a for a in found if a.get("datasource", {}).get("type") == "influxdb"]


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str
    panel: str
    ref: str
    query: str
    interval: str
    # Columns every row must carry: an annotation's text and tags columns (Grafana reads them by name).
    columns: tuple[str, ...] = ()

    @property
    def uses_reservations(self) -> bool:
        return bool(re.search(r'FROM\s+"?reservations"?', self.query))

    @property
    def uses_alerts(self) -> bool:
        return bool(re.search(r'FROM\s+"?alerts"?', self.query))

    def __str__(self) -> str:
        return f"{self.dashboard} / {self.panel} / {self.ref}"


def all_queries() -> list[PanelQuery]:
    out = []
    for d in load_dashboards().values():
        for p in panels(d):
            for t in p.get("targets", []):
                out.append(PanelQuery(d["title"], p["title"], t["refId"], t.get("query", ""), p.get("interval", "")))
        for a in annotation_queries(d):
            t = a.get("target", {})
            columns = (t.get("textColumn", ""), *t.get("tagsColumn", "").split(","))
            out.append(PanelQuery(d["title"], f"annotation {a['name']}", t.get("refId", ""), t.get("query", ""), "",
                                  tuple(c for c in columns if c)))  # fmt: skip
    return out


def the_query(dashboard: str, panel: str) -> str:
    (pq,) = [pq for pq in all_queries() if pq.dashboard == dashboard and pq.panel == panel]
    return pq.query


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


def _selected(query: str) -> set[str]:
    """The names in the outermost SELECT clause of an InfluxQL query."""
    m = re.match(r"\s*SELECT\s+(.*?)\s+FROM\s", query, re.IGNORECASE | re.DOTALL)
    assert m, f"not a SELECT: {query}"
    return {a or b for a, b in re.findall(r'"(\w+)"|\b(\w+)\b', m.group(1))}


def test_annotations_are_raw_influxql_that_select_their_columns() -> None:
    """What Grafana's InfluxQL annotation support reads: the query, text and tags columns in ``target``.

    Grafana builds an annotation from the *columns* of the result (a tag in GROUP BY becomes a series tag and is
    lost), and splits ``tagsColumn`` on commas after removing only its first space.
    """
    problems = []
    for d in load_dashboards().values():
        defined = {v["name"] for v in d.get("templating", {}).get("list", [])}
        for a in annotation_queries(d):
            where = f"{d['title']} / annotation {a.get('name')}"
            t = a.get("target", {})
            query = t.get("query", "")
            if a["datasource"].get("uid") != DATASOURCE_UID or t.get("datasource", {}).get("uid") != DATASOURCE_UID:
                problems.append(f"{where}: data source is not {DATASOURCE_UID}")
            if not (
                t.get("fromAnnotations") is True and t.get("rawQuery") is True and query.strip() and t.get("refId")
            ):
                problems.append(f"{where}: not a raw InfluxQL annotation query in target")
            if not a.get("enable") or not a.get("iconColor"):
                problems.append(f"{where}: not enabled, or no colour")
            if "$timeFilter" not in query or re.search(r"GROUP\s+BY", query, re.IGNORECASE):
                problems.append(f"{where}: needs $timeFilter and no GROUP BY")
            tags = t.get("tagsColumn", "")
            if " " in tags:
                problems.append(f"{where}: spaces in tagsColumn {tags!r}")
            wanted = {t.get("textColumn", ""), *tags.split(",")}
            if "" in wanted or not wanted <= _selected(query):
                problems.append(f"{where}: text and tags columns {sorted(wanted)} not all selected by {query}")
            used = {x or y for x, y in _VAR.findall(query)} - {"timeFilter"}
            if used - defined:
                problems.append(f"{where}: uses undefined variable(s) {sorted(used - defined)}")
    assert not problems, "\n".join(problems)


def test_alert_panels_and_annotations_exist() -> None:
    dashboards = {d["title"]: d for d in load_dashboards().values()}
    for title in ("Fleet overview", "Vehicle detail"):
        d = dashboards[title]
        (table,) = [p for p in panels(d) if p["title"] == "Open alerts"]
        assert table["type"] == "table"
        (target,) = table["targets"]
        # The latest point of each alert decides: opened and resolved points must fall into one group.
        assert '"state"' not in target["query"], f"{title}: Open alerts must not filter or group on state"
        (anno,) = [a for a in annotation_queries(d) if a["name"] == "Alerts opened"]
        assert "\"state\" = 'opened'" in anno["target"]["query"]
        assert anno["target"]["textColumn"] == "message" and anno["target"]["tagsColumn"] == "type,severity"
        filtered = "$vehicle_id" in target["query"] and "$vehicle_id" in anno["target"]["query"]
        assert filtered == (title == "Vehicle detail"), f"{title}: the vehicle filter"
        # Annotations only show on time series panels: each dashboard needs one.
        assert {"timeseries", "state-timeline"} & {p["type"] for p in panels(d)}


# ---- every query against real data -----------------------------------------------------

VEHICLE = "ZOE-001"  # the car the vehicle dashboard is tested with: it gets an unlock command
SIM_CARS = 25  # the first 25 of config/fleet.yaml; the last four get crafted messages
LOW, FRESH, SILENT = "ZOE-022", "ZOE-023", "KANGOO-006"
# Driven off with no trip: ALERTED stays away (its moved_without_trip alert stays open), RETURNED comes back to its
# station and parks (opened, then resolved). The vehicle dashboard's alert queries are tested with ALERTED.
ALERTED, RETURNED = "KANGOO-005", FRESH
AWAY_LAT = 0.018  # degrees north of the home station: 2 km, well beyond the rule's 500 m


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
        await async_wait_for(lambda: both_links_up(rt), what="the gateway connected to the broker")
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

        # Alerts, decided by the gateway's own rules: two cars driving 2 km from their station with no trip open
        # moved_without_trip at once; RETURNED then reports from its station, parked, which resolves its alert.
        def alert_points(state: str, vid: str) -> list[dict[str, Any]]:
            return q(f'SELECT * FROM "alerts" WHERE "state" = \'{state}\' AND "vehicle_id" = \'{vid}\'')

        for vid in (ALERTED, RETURNED):
            home = fleet.stations[fleet.vehicles[vid].station]
            await pub(vid, "location", {"ts": now_ms(), "lat": home.lat + AWAY_LAT, "lon": home.lon, "speed_kmh": 30})
        await async_wait_for(lambda: all(alert_points("opened", v) for v in (ALERTED, RETURNED)),
                             what=f"{ALERTED}'s and {RETURNED}'s alerts opened in InfluxDB")  # fmt: skip
        home = fleet.stations[fleet.vehicles[RETURNED].station]
        await pub(RETURNED, "location", {"ts": now_ms(), "lat": home.lat, "lon": home.lon, "speed_kmh": 0})
        await async_wait_for(
            lambda: alert_points("resolved", RETURNED), what=f"{RETURNED}'s alert resolved in InfluxDB"
        )

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


def _run(
    query: str, populated: Populated, stack: Stack, vehicle_id: str = VEHICLE, interval: str = "10s"
) -> tuple[str, list[dict[str, Any]]]:
    """The query as Grafana would send it for the populated range, and its rows."""
    text = render(query, start_ms=populated.start_ms, end_ms=int(time.time() * 1000) + 1000, interval=interval,
                  variables={"vehicle_id": vehicle_id})  # fmt: skip
    return text, influx_query(stack.influx.port, populated.database, text)


@pytest.mark.integration
@pytest.mark.parametrize("pq", _cases())
def test_panel_query_returns_data(pq: PanelQuery, populated: Populated, stack: Stack) -> None:
    vehicle_id = ALERTED if pq.uses_alerts else VEHICLE
    try:
        query, rows = _run(pq.query, populated, stack, vehicle_id, pq.interval or "10s")
    except AssertionError as e:
        pytest.fail(f"{pq}: the query fails: {e}")
    assert rows, f"{pq}: no data for\n  {query}"
    values = [v for r in rows for k, v in r.items() if k not in ("time", "name") and v is not None]
    assert values, f"{pq}: only empty rows for\n  {query}"
    for column in pq.columns:
        assert all(r.get(column) is not None for r in rows), f"{pq}: rows without {column!r} for\n  {query}"


@pytest.mark.integration
def test_open_alerts_list_the_open_alert_and_not_the_resolved_one(populated: Populated, stack: Stack) -> None:
    def points(state: str) -> dict[str, dict[str, Any]]:
        rows = influx_query(stack.influx.port, populated.database,
                            f"SELECT * FROM \"alerts\" WHERE \"state\" = '{state}'")  # fmt: skip
        mine = [r for r in rows if r["vehicle_id"] in (ALERTED, RETURNED)]
        by_car = {r["vehicle_id"]: r for r in mine}
        assert len(by_car) == len(mine), f"more than one {state} point for a car: {mine}"
        return by_car

    # What the gateway wrote: ALERTED's alert opened; RETURNED's opened, then resolved.
    opened, resolved = points("opened"), points("resolved")
    assert set(opened) == {ALERTED, RETURNED} and set(resolved) == {RETURNED}, (opened, resolved)
    assert opened[RETURNED]["alert_id"] == resolved[RETURNED]["alert_id"]

    _, fleet_rows = _run(the_query("Fleet overview", "Open alerts"), populated, stack)
    listed = {r["vehicle_id"]: r for r in fleet_rows}
    assert ALERTED in listed, fleet_rows
    assert RETURNED not in listed, f"{RETURNED}'s alert was resolved, yet it is listed: {listed[RETURNED]}"
    row, point = listed[ALERTED], opened[ALERTED]
    assert (row["type"], row["severity"]) == ("moved_without_trip", "critical")
    assert (row["alert_id"], row["message"]) == (point["alert_id"], point["message"])
    assert row["time"] == point["time"], "'Opened' is when the alert opened, not the start of the window"

    _, mine = _run(the_query("Vehicle detail", "Open alerts"), populated, stack, ALERTED)
    assert [r["alert_id"] for r in mine] == [point["alert_id"]]
    assert _run(the_query("Vehicle detail", "Open alerts"), populated, stack, RETURNED)[1] == []

    # The annotations mark every alert that opened in the range, resolved since or not, each with its message.
    _, marks = _run(the_query("Fleet overview", "annotation Alerts opened"), populated, stack)
    assert {opened[v]["message"] for v in (ALERTED, RETURNED)} <= {r["message"] for r in marks}
    _, marks = _run(the_query("Vehicle detail", "annotation Alerts opened"), populated, stack, RETURNED)
    assert [(r["time"], r["message"], r["type"], r["severity"]) for r in marks] == [
        (opened[RETURNED]["time"], opened[RETURNED]["message"], "moved_without_trip", "critical")
    ]


@pytest.mark.integration
def test_vehicle_variable_lists_the_cars(populated: Populated, stack: Stack) -> None:
    (vehicle,) = [d for d in load_dashboards().values() if d["title"] == "Vehicle detail"]
    (var,) = vehicle["templating"]["list"]
    rows = influx_query(stack.influx.port, populated.database, var["query"])
    assert {r["value"] for r in rows} >= {VEHICLE, LOW, SILENT}
