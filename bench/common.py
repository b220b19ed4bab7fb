"""What the benchmarks share: the gateway as a child process, configured through its environment."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from scripts import services

REPO = Path(__file__).resolve().parent.parent
MASTER = "bench-master-key-0123456789"
API_KEY = "bench-api-key-0123456789"


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
            raise SystemExit(f"the gateway exited with {proc.returncode} before it was up")
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
    raise SystemExit(f"the gateway did not connect to the broker within {timeout:.0f} s")


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
