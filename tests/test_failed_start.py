"""A start that cannot succeed stops with one line naming the problem and exit status 2.

Each case runs the real ``python -m gateway`` against the suite's real
Mosquitto and InfluxDB, with one thing broken. The promise tested: exit 2,
one line on stderr saying what and where, no traceback, no warning from a
resource left open (aiohttp's "Unclosed client session").
"""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from scripts.services import free_port
from tests.conftest import Stack, Unique
from tests.helpers import API_KEY, MASTER_KEY, REPO
from tests.processes import GatewayProcess

pytestmark = pytest.mark.integration


def run_gateway(stack: Stack, unique: Unique, state_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {
        **os.environ,
        "GATEWAY__DEV_MODE": "true",
        "GATEWAY__MQTT__PORT": str(stack.broker.port),
        "GATEWAY__MQTT__TOPIC_PREFIX": unique.prefix,
        "GATEWAY__MQTT__CLIENT_ID": f"gw-{unique.database}",
        "GATEWAY__INFLUX__URL": f"http://127.0.0.1:{stack.influx.port}",
        "GATEWAY__INFLUX__DATABASE": unique.database,
        "GATEWAY__INFLUX__START_TIMEOUT_S": "0.5",
        "GATEWAY__HTTP__PORT": str(free_port()),
        "GATEWAY__STATE__DIR": str(state_dir),
        "GATEWAY__COMMANDS__MASTER_KEY": MASTER_KEY,
        "GATEWAY__API__KEYS": API_KEY,
        **env,
    }
    config = REPO / "config" / "gateway.yaml"
    return subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(config)],
        cwd=REPO,
        env=environ,
        capture_output=True,
        text=True,
        timeout=30,
    )


def assert_one_line_exit_2(p: subprocess.CompletedProcess[str], *needles: str) -> str:
    lines = [ln for ln in p.stderr.splitlines() if "gateway: " in ln and "cannot start" in ln]
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert len(lines) == 1, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and "Unclosed" not in p.stderr, p.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def corrupt_store(state: Path) -> None:
    state.mkdir()
    (state / "gateway.sqlite3").write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)


def store_is_a_directory(state: Path) -> None:
    (state / "gateway.sqlite3").mkdir(parents=True)


def newer_store(state: Path) -> None:
    state.mkdir()
    sqlite3.connect(state / "gateway.sqlite3").execute("PRAGMA user_version = 999")


@pytest.mark.parametrize(
    ("breaks", "needles"),
    [
        (corrupt_store, ("store:", "gateway.sqlite3", "not a usable SQLite database")),
        (store_is_a_directory, ("store:", "gateway.sqlite3")),
        (newer_store, ("store:", "newer than this gateway")),
    ],
    ids=["corrupt", "unreadable", "newer-schema"],
)
def test_a_store_that_cannot_be_used(
    stack: Stack, unique: Unique, tmp_path: Path, breaks: Callable[[Path], None], needles: tuple[str, ...]
) -> None:
    state = tmp_path / "state"
    breaks(state)
    assert_one_line_exit_2(run_gateway(stack, unique, state), *needles)


def test_a_state_directory_that_cannot_be_written(stack: Stack, unique: Unique, tmp_path: Path) -> None:
    # A plain file where a directory should be: refused even to root, who ignores permission bits.
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    assert_one_line_exit_2(run_gateway(stack, unique, blocker / "state"), "state.dir:", "not-a-dir")


def test_a_sqlite_store_url_whose_directory_cannot_be_made(stack: Stack, unique: Unique, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    url = f"sqlite:///{blocker}/fleet.db"  # an absolute path: sqlite:////tmp/...
    line = assert_one_line_exit_2(run_gateway(stack, unique, tmp_path / "state", GATEWAY__STORE__URL=url), "store.url:")
    assert "cannot create the directory" in line and "not-a-dir" in line, line


@pytest.mark.parametrize("shared", ["state.dir", "store.url"])
def test_a_second_gateway_on_a_running_ones_state_or_sqlite_file(
    stack: Stack, unique: Unique, tmp_path: Path, shared: str
) -> None:
    # Two gateways on one journal would replay and delete each other's batches; on one SQLite file both
    # would hold the lease. The second is refused, and the first goes on.
    first = GatewayProcess(tmp_path, stack.broker.port, stack.influx.port, unique.prefix, unique.database)
    first.start()
    try:
        if shared == "state.dir":
            p = run_gateway(stack, unique, tmp_path / "state")
        else:
            url = f"sqlite:///{tmp_path / 'state' / 'gateway.sqlite3'}"
            p = run_gateway(stack, unique, tmp_path / "other-state", GATEWAY__STORE__URL=url)
        line = assert_one_line_exit_2(p, f"{shared}:", "in use by another gateway")
        assert first.health() is not None, line
    finally:
        first.terminate()
    # Stopped, it lets the next one in.
    first.start()
    first.terminate()


def test_the_http_port_in_use(stack: Stack, unique: Unique, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = run_gateway(stack, unique, tmp_path / "state", GATEWAY__HTTP__PORT=str(port))
    assert_one_line_exit_2(p, "http.port:", f"127.0.0.1:{port}")


def test_influxdb_unreachable_at_start(stack: Stack, unique: Unique, tmp_path: Path) -> None:
    dead = free_port()
    p = run_gateway(stack, unique, tmp_path / "state", GATEWAY__INFLUX__URL=f"http://127.0.0.1:{dead}")
    assert_one_line_exit_2(p, "influx.url:", f"127.0.0.1:{dead}", "not reachable")


def test_the_same_settings_start_when_nothing_is_broken(stack: Stack, unique: Unique, tmp_path: Path) -> None:
    """The cases above fail for their one reason: with it removed, the gateway runs until stopped."""
    environ = {
        **os.environ,
        "GATEWAY__DEV_MODE": "true",
        "GATEWAY__MQTT__PORT": str(stack.broker.port),
        "GATEWAY__MQTT__TOPIC_PREFIX": unique.prefix,
        "GATEWAY__INFLUX__URL": f"http://127.0.0.1:{stack.influx.port}",
        "GATEWAY__INFLUX__DATABASE": unique.database,
        "GATEWAY__HTTP__PORT": str(free_port()),
        "GATEWAY__STATE__DIR": str(tmp_path / "state"),
        "GATEWAY__COMMANDS__MASTER_KEY": MASTER_KEY,
        "GATEWAY__API__KEYS": API_KEY,
    }
    proc = subprocess.Popen([sys.executable, "-m", "gateway"], cwd=REPO, env=environ, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []

    def read() -> None:
        # SIGTERM the moment "up" is read, as a supervisor may: the gateway must stop cleanly even then.
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "gateway gw1 up" in line:
                proc.terminate()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(60)  # however long a loaded machine takes to get up and down
    finally:
        proc.kill()
        reader.join(5)
        assert proc.stderr is not None
        proc.stderr.close()
    err = "".join(lines)
    assert proc.returncode == 0, err[-2000:]
    assert "gateway gw1 up" in err and "stopped" in err
