"""The monthly usage statement at scale: 10,000 cars and a year of trips, against one plain SQL GROUP BY.

Builds a SQLite store with the gateway's own schema and about 2 million
ended trips spread over a year (the Orne department's rate per car, times
10,000 cars), then times, in the same run and interleaved:

* the statement: ``Rentals.usage``'s work — the store's sums (``SqliteStore.usage``:
  a month's users grouped along their index, each car's month read from the
  sums that ending a trip keeps up to date) and their assembly into totals,
  kinds, stations, cars and users (``gateway.rules.usage.usage_report``);
* the baseline: the per-user sums written as one plain ``GROUP BY user_id``
  over the same rows, fetched.

It prints the median of each and their ratio (the aim: at most 1.5×).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from dataclasses import astuple, fields
from pathlib import Path

from gateway.fleet import Fleet, load_fleet
from gateway.rules.billing import Tariff, amount_cents, billed_minutes, hours_in_month, month_bounds, month_of
from gateway.rules.reservations import Kind
from gateway.rules.trips import Trip
from gateway.rules.usage import usage_report
from gateway.store.sqlite import SqliteStore, open_sqlite

REPO = Path(__file__).resolve().parent.parent
YEAR_START_MS = 1_767_222_000_000  # 2026-01-01T00:00:00+01:00
MONTH = "2026-06"
BASELINE_SQL = (
    "SELECT user_id, count(*), sum(billed_min), sum(distance_km), sum(amount_cents) FROM trips "
    "WHERE ended_ms IS NOT NULL AND started_ms >= ? AND started_ms < ? GROUP BY user_id"
)


def build(store: SqliteStore, fleet: Fleet, trips: int, users: int, seed: int) -> None:
    rng = random.Random(seed)
    tariff = Tariff()
    cars = list(fleet.vehicles.values())
    columns = ", ".join([*(f.name for f in fields(Trip)), "month"])
    sql = f"INSERT INTO trips ({columns}) VALUES ({','.join('?' * (len(fields(Trip)) + 1))})"
    year_ms = 365 * 86_400_000
    batch = []
    t0 = time.perf_counter()
    for i in range(trips):
        car = cars[rng.randrange(len(cars))]
        kind: Kind = "staff" if rng.random() < 0.3 else "public"
        start = YEAR_START_MS + rng.randrange(year_ms)
        booked = rng.choice((1, 2, 2, 3, 4, 8)) * 3_600_000
        actual = int(booked * rng.uniform(0.5, 1.2))
        billed = billed_minutes(booked, actual, tariff.increment_min)
        odo = rng.uniform(1000, 90000)
        km = round(rng.uniform(2, 120), 1)
        t = Trip(
            f"R-{i}", car.id, f"U-{rng.randrange(users)}", kind, car.station, start, start + booked, start, odo, 80.0,
            start + actual, "user", False, odo + km, 60.0, True, km, round(km * 0.17, 2), actual / 60_000, 0.0,
            billed, amount_cents(billed, kind, tariff),
        )  # fmt: skip
        batch.append((*astuple(t), month_of(start, "Europe/Paris")))
        if len(batch) == 50_000:
            with store._tx():
                store.db.executemany(sql, batch)
            batch.clear()
            print(f"\r  {i + 1:,} trips written ({time.perf_counter() - t0:.0f} s)", end="", flush=True)
    if batch:
        with store._tx():
            store.db.executemany(sql, batch)
    # What end_trip keeps up to date trip by trip, summed once for the bulk load.
    store.rebuild_usage()
    store.db.execute("ANALYZE")
    print(f"\r  {trips:,} trips written in {time.perf_counter() - t0:.0f} s")


async def statement(store: SqliteStore, fleet: Fleet) -> int:
    rows = await store.usage(MONTH)
    report = usage_report(MONTH, rows, Tariff(), fleet.vehicles, fleet.stations, hours_in_month(MONTH, "Europe/Paris"))
    return len(report["users"])


def baseline(store: SqliteStore) -> int:
    start, end = month_bounds(MONTH, "Europe/Paris")
    return len(store.db.execute(BASELINE_SQL, (start, end)).fetchall())


async def measure(args: argparse.Namespace, path: Path) -> int:
    fleet = load_fleet(REPO / "config" / "fleet.yaml").with_generated(args.cars)
    store = open_sqlite(path)
    print(f"{args.cars:,} cars, {args.trips:,} trips over 2026, {args.users:,} users; statement of {MONTH}")
    build(store, fleet, args.trips, args.users, args.seed)
    ours: list[float] = []
    base: list[float] = []
    users = 0
    for r in range(args.rounds + 1):  # the first round warms the page cache and is not counted
        t = time.perf_counter()
        users = await statement(store, fleet)
        a = time.perf_counter() - t
        t = time.perf_counter()
        n = baseline(store)
        b = time.perf_counter() - t
        if users != n:
            raise SystemExit(f"the statement has {users} users, the baseline {n}: they do not agree")
        if r:
            ours.append(a)
            base.append(b)
            print(f"  round {r}: statement {a * 1000:7.1f} ms   plain GROUP BY {b * 1000:7.1f} ms")
    mo, mb = statistics.median(ours), statistics.median(base)
    print(f"\n{users:,} users in the month")
    print(f"  usage statement (store sums + assembly): {mo * 1000:.1f} ms")
    print(f"  one plain SQL GROUP BY user_id:          {mb * 1000:.1f} ms")
    print(f"  statement / plain query = {mo / mb:.2f}x")
    await store.close()
    return 0


def _count(v: str) -> int:
    n = int(v)
    if n < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--cars", type=_count, default=10_000, help="cars in the fleet (default 10,000)")
    p.add_argument("--trips", type=_count, default=2_000_000, help="ended trips over the year (default 2,000,000)")
    p.add_argument("--users", type=_count, default=400_000, help="distinct users (default 400,000)")
    p.add_argument("--rounds", type=_count, default=5, help="timed rounds; medians are reported (default 5)")
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-report-") as d:
        return asyncio.run(measure(args, Path(d) / "gateway.sqlite3"))


if __name__ == "__main__":
    sys.exit(main())
