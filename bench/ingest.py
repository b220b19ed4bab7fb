"""Ingest throughput and loss at QoS 1: the gateway against two baselines, in one run.

For each consumer in turn — a bare paho subscriber that only counts (the
ceiling), the naive paho + influxdb_client.Point script (what a user writes
first), and the gateway — it starts a fresh consumer, then one
``mosquitto_pub -l`` per car publishing that car's messages at QoS 1 as
fast as the broker takes them, and times from the first publish until every
message is counted (by the subscriber, or as rows in InfluxDB). The broker
keeps every queued QoS 1 message (``max_queued_messages``), so a slow
consumer is slow, not lossy; loss is what never arrives.

    python -m bench.ingest [--cars 20] [--messages 5000] [--rounds 2] [--window 32]
    python -m bench.ingest --instances 2 --store postgresql

The `windowed` consumer is the gateway again, announcing a receive maximum
of ``--window`` unacknowledged messages (EMQX's default is 32) instead of
its default 20,000: the broker then waits for our acks every few messages.

With ``--instances N`` (N > 1) or ``--store postgresql``, the measured
consumers become `gateway` (one gateway on its SQLite file, the baseline)
and `shared`: N gateways (gw1, gw2, ...) on one PostgreSQL the bench starts
in its temporary directory (a fresh database per round), splitting the
cars' traffic through the MQTT shared subscription group ``g``, each with
its own state dir, HTTP port and client id, all writing to one InfluxDB
database, whose rows are counted as for the others. ``--only`` adds
the other consumers back. Prints shared/gateway besides the rates.

Prints each rate and the ratios gateway/bare, gateway/naive and
windowed/gateway; rounds are
interleaved and the median of each is reported, since the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import select
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from bench.common import (
    REPO,
    create_pg_database,
    postgres_if,
    start_gateways,
    stop_all,
    wait_until,
)
from scripts import services
from scripts.postgresql import PostgresService
from scripts.services import service_errors_exit_2

T0_MS = (int(time.time()) - 86_400) * 1000  # a day ago: the gateway refuses readings older than a week


def count_rows(influx_port: int, db: str) -> int:
    q = urllib.parse.urlencode({"db": db, "q": "SELECT count(soc_pct) FROM battery"})
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{influx_port}/query?{q}", timeout=10) as r:
            body = json.load(r)
        series = body["results"][0].get("series")
        return int(series[0]["values"][0][1]) if series else 0
    except (OSError, KeyError, ValueError):
        return 0


def make_payloads(workdir: Path, cars: list[str], per_car: int) -> dict[str, Path]:
    files = {}
    for i, car in enumerate(cars):
        path = workdir / f"{car}.jsonl"
        with open(path, "w") as f:
            for n in range(per_car):
                soc = 100 - (n % 1000) / 10
                f.write(f'{{"ts": {T0_MS + i * per_car + n}, "soc_pct": {soc}, "range_km": {soc * 3:.1f}, ')
                f.write(f'"charging": false, "plugged": {str(n % 2 == 0).lower()}}}\n')
        files[car] = path
    return files


def publish_all(broker_port: int, prefix: str, files: dict[str, Path]) -> list[subprocess.Popen[bytes]]:
    procs = []
    for car, path in files.items():
        with open(path, "rb") as stdin:
            procs.append(
                subprocess.Popen(
                    [
                        "mosquitto_pub",
                        "-p",
                        str(broker_port),
                        "-q",
                        "1",
                        "-M",
                        "1000",
                        "-l",
                        "-t",
                        f"{prefix}/{car}/battery",
                        "-i",
                        f"pub-{prefix}-{car}",
                    ],
                    stdin=stdin,
                )
            )
    return procs


class Run:
    def __init__(
        self,
        args: argparse.Namespace,
        broker: services.Service,
        influx: services.Service,
        proxy: services.Service,
        work: Path,
        pg: PostgresService | None = None,
    ):
        self.args = args
        self.broker = broker
        self.influx = influx
        self.pg = pg
        # The naive script writes through influxdb_client (/api/v2/write): via the test proxy.
        self.proxy_port = proxy.port
        self.work = work
        self.cars = [f"ZOE-{i + 1:03d}" for i in range(args.cars)]
        self.total = args.cars * args.messages
        self.files = make_payloads(work, self.cars, args.messages)
        self.n = 0

    def _names(self, kind: str) -> tuple[str, str]:
        self.n += 1
        return f"b{self.n}{kind}/fleet", f"bench_{self.n}_{kind}"

    def _consumer(self, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)

    def _timed(self, prefix: str, done: Callable[[], bool], counted: Callable[[], int]) -> tuple[float, int]:
        pubs = publish_all(self.broker.port, prefix, self.files)
        t0 = time.perf_counter()
        finished = wait_until(done, timeout=self.args.timeout, poll=0.05)
        elapsed = time.perf_counter() - t0
        for p in pubs:
            p.wait()
        if not finished:  # give stragglers a last chance before calling them lost
            wait_until(done, timeout=10)
        return self.total / elapsed, self.total - counted()

    def _timed_storage(self, prefix: str, db: str) -> tuple[float, int]:
        """Time until InfluxDB holds every message as a row."""

        def rows() -> int:
            return count_rows(self.influx.port, db)

        return self._timed(prefix, lambda: rows() >= self.total, rows)

    def bare(self) -> tuple[float, int]:
        prefix, _ = self._names("bare")
        c = self._consumer(
            [sys.executable, "-m", "bench.consumers", "bare", "--port", str(self.broker.port)]
            + ["--prefix", prefix, "--count", str(self.total), "--client-id", f"c-{prefix}"]
        )
        out = c.stdout
        assert out is not None
        assert out.readline().strip() == "ready"
        got = {"done": False}

        def done() -> bool:
            if select.select([out], [], [], 0)[0] and out.readline().strip() == "done":
                got["done"] = True
            return got["done"]

        try:
            return self._timed(prefix, done, lambda: self.total if got["done"] else 0)
        finally:
            c.terminate()
            c.wait()

    def naive(self) -> tuple[float, int]:
        prefix, db = self._names("naive")
        services.create_database(self.influx.port, db)
        c = self._consumer(
            [sys.executable, "-m", "bench.consumers", "naive", "--port", str(self.broker.port)]
            + ["--prefix", prefix, "--client-id", f"c-{prefix}", "--database", db]
            + ["--influx-url", f"http://127.0.0.1:{self.proxy_port}"]
        )
        assert c.stdout is not None
        assert c.stdout.readline().strip() == "ready"
        try:
            return self._timed_storage(prefix, db)
        finally:
            c.terminate()
            c.wait()

    def gateway(self) -> tuple[float, int]:
        return self._gateway("gw")

    def windowed(self) -> tuple[float, int]:
        """The gateway announcing a small receive window, as under EMQX's default of 32 in flight."""
        return self._gateway("gwwin", GATEWAY__MQTT__RECEIVE_MAXIMUM=str(self.args.window))

    def shared(self) -> tuple[float, int]:
        """`--instances` gateways on one store (PostgreSQL: a fresh database) in one shared group."""
        prefix, db = self._names("shared")
        store_url = None
        if self.args.store == "postgresql":
            assert self.pg is not None
            store_url = create_pg_database(self.pg, db)
        group = "g" if self.args.instances > 1 else None
        return self._gateway_at(prefix, db, self.args.instances, store_url, group)

    def _gateway(self, kind: str, **extra: str) -> tuple[float, int]:
        prefix, db = self._names(kind)
        return self._gateway_at(prefix, db, 1, None, None, **extra)

    def _gateway_at(
        self, prefix: str, db: str, instances: int, store_url: str | None, group: str | None, **extra: str
    ) -> tuple[float, int]:
        procs, _ = start_gateways(
            self.broker.port,
            self.influx.port,
            self.work / f"state-{db}",
            f"gw-{prefix}",
            instances,
            store_url,
            group,
            GATEWAY__MQTT__TOPIC_PREFIX=prefix,
            GATEWAY__INFLUX__DATABASE=db,
            **extra,
        )
        try:
            return self._timed_storage(prefix, db)
        finally:
            stop_all(procs)


@service_errors_exit_2
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__.split("\n\n")[0])
    p.add_argument("--cars", type=int, default=20, help="publishing cars, one mosquitto_pub each (default 20)")
    p.add_argument("--messages", type=int, default=5000, help="messages per car (default 5000)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds; medians are reported (default 2)")
    p.add_argument("--timeout", type=float, default=120, help="give up on one consumer after this long")
    p.add_argument(
        "--only",
        choices=["bare", "naive", "gateway", "windowed", "shared"],
        action="append",
        help="measure only these (`shared` needs --instances > 1 or --store postgresql)",
    )
    p.add_argument("--window", type=int, default=32, help="mqtt.receive_maximum of the `windowed` gateway (default 32)")
    p.add_argument(
        "--instances",
        type=int,
        default=1,
        help="gateways of the `shared` consumer, in one MQTT shared group (default 1: no `shared` consumer)",
    )
    p.add_argument(
        "--store",
        choices=["sqlite", "postgresql"],
        default="sqlite",
        help="store of the `shared` consumer (default sqlite, for one instance only): postgresql is "
        "started by the bench. With --instances > 1 or postgresql, the consumers are `gateway` "
        "(one on SQLite, the baseline) and `shared`, unless --only says otherwise",
    )
    args = p.parse_args(argv)
    if args.instances < 1:
        p.error("--instances must be at least 1")
    multi = args.instances > 1 or args.store == "postgresql"
    if args.only and "shared" in args.only and not multi:
        p.error("`shared` needs --instances > 1 or --store postgresql")
    if args.instances > 1 and args.store == "sqlite":
        p.error("several instances need a shared store: --store postgresql")
    default_kinds = ["gateway", "shared"] if multi else ["bare", "naive", "gateway", "windowed"]
    shared_label = f"{args.instances} gw {args.store}"

    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        work = Path(tmp)
        broker = services.start_mosquitto(work / "mosquitto")
        influx = services.start_influxd(work / "influxdb")
        proxy = services.start_nginx_v2_proxy(work / "nginx", influx.port)
        try:
            with postgres_if(args.store == "postgresql", work / "postgres") as pg:
                run = Run(args, broker, influx, proxy, work, pg)
                kinds = args.only or default_kinds
                results: dict[str, list[tuple[float, int]]] = {k: [] for k in kinds}
                print(
                    f"{run.total} QoS 1 messages from {args.cars} cars per consumer, {args.rounds} round(s)",
                    flush=True,
                )
                if "shared" in kinds:
                    print(f"  shared = {shared_label} (shared group g), gateway = 1 gw sqlite", flush=True)
                for r in range(args.rounds):
                    for kind in kinds:
                        rate, lost = getattr(run, kind)()
                        results[kind].append((rate, lost))
                        print(f"  round {r + 1}: {kind:8s} {rate:9,.0f} msg/s  lost {lost}", flush=True)
        finally:
            for s in (proxy, influx, broker):
                s.stop()
    med = {k: statistics.median(r for r, _ in v) for k, v in results.items()}
    lost = {k: sum(n for _, n in v) for k, v in results.items()}
    print("\nmedian msg/s (publish -> counted), total lost:")
    for k in kinds:
        print(f"  {k:8s} {med[k]:9,.0f}  lost {lost[k]}")
    if "gateway" in med:
        if "bare" in med:
            print(f"  gateway / bare subscriber = {med['gateway'] / med['bare']:.2f}x")
        if "naive" in med:
            print(f"  gateway / naive script    = {med['gateway'] / med['naive']:.2f}x")
        if "windowed" in med:
            print(f"  window {args.window} / default window = {med['windowed'] / med['gateway']:.2f}x")
        if "shared" in med:
            print(f"  {shared_label} / 1 gw sqlite = {med['shared'] / med['gateway']:.2f}x")
    return 0 if all(n == 0 for n in lost.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
