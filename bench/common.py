"""What the benchmarks share: the gateway as a child process, configured through its environment."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import psycopg
from psycopg import sql

from scripts import services
from scripts.postgresql import PostgresService, start_postgres

REPO = Path(__file__).resolve().parent.parent
MASTER = "bench-master-key-0123456789"
API_KEY = "bench-api-key-0123456789"


def percentile(xs: Sequence[float], q: int) -> float:
    """The q-th percentile (1 to 99) of `xs`, the extremes included: how every benchmark here reports."""
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1]


def wait_until(cond: Callable[[], bool], timeout: float, poll: float = 0.2) -> bool:
    """Poll `cond` until it holds or `timeout` passes; whether it held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(poll)
    return cond()


def gateway_env(broker_port: int, influx_port: int, http_port: int, state_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a benchmarked gateway: this run's services and keys, quiet logs, plus `extra`."""
    env = dict(os.environ)
    env.update(
        GATEWAY__MQTT__PORT=str(broker_port),
        GATEWAY__INFLUX__URL=f"http://127.0.0.1:{influx_port}",
        GATEWAY__HTTP__PORT=str(http_port),
        GATEWAY__STATE__DIR=str(state_dir),
        GATEWAY__COMMANDS__MASTER_KEY=MASTER,
        GATEWAY__API__KEYS=API_KEY,
        GATEWAY__LOG_LEVEL="WARNING",
    )
    env.update(extra)
    return env


def start_gateway(env: dict[str, str], http_port: int, timeout: float = 60) -> subprocess.Popen[bytes]:
    """Start `python -m gateway` and return once it is connected to the broker."""
    proc = subprocess.Popen([sys.executable, "-m", "gateway"], cwd=REPO, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise services.ServiceError(f"the gateway exited with {proc.returncode} before it was up")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=1) as r:
                if json.load(r)["broker"] == "connected":
                    return proc
        except urllib.error.HTTPError as e:  # 503 while InfluxDB has not been written to yet, say
            if json.load(e).get("broker") == "connected":
                return proc
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    proc.kill()
    raise services.ServiceError(f"the gateway did not connect to the broker within {timeout:.0f} s")


def create_pg_database(pg: PostgresService, name: str) -> str:
    """A new, empty database `name` in the bench's PostgreSQL (the gateway migrates it); its URL."""
    with psycopg.connect(pg.url, autocommit=True) as c:  # CREATE DATABASE cannot run in a transaction
        c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return pg.url_for(name)


@contextlib.contextmanager
def postgres_if(wanted: bool, workdir: Path) -> Iterator[PostgresService | None]:
    """A private PostgreSQL in `workdir` for the run if `wanted` (else None), stopped afterwards."""
    if not wanted:
        yield None
        return
    pg = start_postgres(workdir)
    try:
        yield pg
    finally:
        pg.stop()


def start_gateways(
    broker_port: int,
    influx_port: int,
    state_dir: Path,
    client_id: str,
    instances: int = 1,
    store_url: str | None = None,
    group: str | None = None,
    **extra: str,
) -> tuple[list[subprocess.Popen[bytes]], list[int]]:
    """Start `instances` gateways, one after the other (the first migrates the store); (processes, HTTP ports).

    One gateway without `store_url` or `group` is configured exactly as `gateway_env` alone would:
    its SQLite store in `state_dir`, `client_id` as is. Otherwise instance i (gw1, gw2, ...) gets
    ``GATEWAY__INSTANCE``, a state dir ``state_dir/gw<i>``, the client id ``<client_id>-gw<i>``
    and its own HTTP port, and all of them share `store_url` (``GATEWAY__STORE__URL``) and the
    MQTT shared subscription `group` (``GATEWAY__MQTT__SHARED_GROUP``).
    """
    single = instances == 1 and store_url is None and group is None
    procs: list[subprocess.Popen[bytes]] = []
    ports: list[int] = []
    try:
        for i in range(instances):
            http_port = services.free_port()
            own = dict(extra)
            if single:
                own.update(GATEWAY__MQTT__CLIENT_ID=client_id)
                where = state_dir
            else:
                name = f"gw{i + 1}"
                own.update(GATEWAY__INSTANCE=name, GATEWAY__MQTT__CLIENT_ID=f"{client_id}-{name}")
                where = state_dir / name
                if store_url is not None:
                    own.update(GATEWAY__STORE__URL=store_url)
                if group is not None:
                    own.update(GATEWAY__MQTT__SHARED_GROUP=group)
            env = gateway_env(broker_port, influx_port, http_port, where, **own)
            procs.append(start_gateway(env, http_port))
            ports.append(http_port)
    except BaseException:
        stop_all(procs)
        raise
    return procs, ports


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """Terminate every process (all at once, then wait for each), last started first."""
    for p in reversed(procs):
        p.terminate()
    for p in reversed(procs):
        p.wait()


@contextlib.contextmanager
def broker_and_database(name: str) -> Iterator[tuple[Path, services.Service, services.Service]]:
    """A private Mosquitto and InfluxDB for one benchmark run, in a temporary directory: (dir, broker, influx)."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        work = Path(tmp)
        broker = services.start_mosquitto(work / "mosquitto")
        try:
            influx = services.start_influxd(work / "influxdb")
            try:
                yield work, broker, influx
            finally:
                influx.stop()
        finally:
            broker.stop()
