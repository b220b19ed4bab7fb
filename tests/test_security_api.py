"""Threat: a leaked API key, and secrets that leak through configuration or logs.

- The gateway refuses to start with a missing or example master key or API key
  outside dev_mode (``python -m gateway`` exits 2 with one line naming the key).
- Unlock and lock are rate-limited per API key (429 with Retry-After), so a
  leaked key opens a few cars, not the fleet, before it is revoked; a revoked
  key (removed from ``api.keys``) is refused.
- No key is ever logged: a production gateway at DEBUG level runs through
  start-up, requests with a good and a bad key, an unlock and shutdown, and
  none of its secrets, nor the car keys and passwords derived from them,
  appear in what it prints.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from device_sim import SimConfig, SimFleet
from device_sim.physics import rfc3339_ms
from gateway.app import init_app
from gateway.fleet import load_fleet
from gateway.provision import mqtt_password
from gateway.signing import vehicle_key
from scripts.services import free_port, port_open
from tests.conftest import Stack, Unique
from tests.helpers import REPO, async_wait_for, gateway_settings
from tests.secure_broker import SecureBroker, start_secure_broker

FLEET = load_fleet(REPO / "config" / "fleet.yaml")
KEY_1 = "booking-key-one-" + secrets.token_hex(8)
KEY_2 = "booking-key-two-" + secrets.token_hex(8)


def gateway(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(REPO / "config" / "gateway.yaml"), *args],
        capture_output=True, text=True, timeout=60, check=False, cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "GATEWAY__FLEET__FILE": str(REPO / "config" / "fleet.yaml"), **env},
    )  # fmt: skip


# ---- refusing to start -------------------------------------------------------------------------------

GOOD = {"GATEWAY__DEV_MODE": "false", "GATEWAY__COMMANDS__MASTER_KEY": "m" * 24, "GATEWAY__API__KEYS": KEY_1}


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"GATEWAY__COMMANDS__MASTER_KEY": "change-me"}, "commands.master_key"),
        ({"GATEWAY__COMMANDS__MASTER_KEY": "dev-master-key"}, "commands.master_key"),
        ({"GATEWAY__COMMANDS__MASTER_KEY": ""}, "commands.master_key"),
        ({"GATEWAY__COMMANDS__MASTER_KEY": "short-key"}, "commands.master_key"),
        ({"GATEWAY__API__KEYS": ""}, "api.keys"),
        ({"GATEWAY__API__KEYS": "dev-api-key"}, "api.keys"),
        ({"GATEWAY__API__KEYS": f"{KEY_1},change-me"}, "api.keys"),
    ],
    ids=["example-master", "shipped-master", "empty-master", "short-master", "no-api-key", "shipped-api-key",
         "one-example-api-key"],
)  # fmt: skip
@pytest.mark.parametrize("command", ["run", "check-config"])
def test_the_gateway_refuses_to_start_with_a_default_or_empty_key(
    override: dict[str, str], key: str, command: str
) -> None:
    r = gateway(command, env=GOOD | override)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], r.stderr
    for value in override.values():
        for secret in filter(None, value.split(",")):
            assert secret not in r.stderr and secret not in r.stdout


def test_the_same_keys_are_accepted_in_explicit_dev_mode_only() -> None:
    assert gateway("check-config", env=GOOD).returncode == 0
    shipped = {"GATEWAY__COMMANDS__MASTER_KEY": "dev-master-key", "GATEWAY__API__KEYS": "dev-api-key"}
    assert gateway("check-config", env=shipped | {"GATEWAY__DEV_MODE": "true"}).returncode == 0
    assert gateway("check-config", env=shipped | {"GATEWAY__DEV_MODE": "false"}).returncode == 2


# ---- a leaked API key: rate limit and revocation --------------------------------------------------------


@pytest.mark.integration
async def test_unlock_and_lock_are_rate_limited_per_key_with_retry_after(
    stack: Stack, unique: Unique, tmp_path: Path, aiohttp_client: Callable[..., Any]
) -> None:
    settings = gateway_settings(
        stack.broker.port, f"http://127.0.0.1:{stack.influx.port}", unique.prefix, unique.database, tmp_path,
        api__keys=[KEY_1, KEY_2], api__rate_limit_per_min=3,
    )  # fmt: skip
    client = await aiohttp_client(init_app(settings, FLEET))
    h1, h2 = {"Authorization": f"Bearer {KEY_1}"}, {"Authorization": f"Bearer {KEY_2}"}
    unknown = {"reservation_id": "R-NOPE"}
    # Three calls a minute: unlock, lock, and a malformed one all count.
    r = await client.post("/v1/vehicles/ZOE-001/unlock", json=unknown, headers=h1)
    assert r.status == 404
    r = await client.post("/v1/vehicles/ZOE-001/lock", json=unknown, headers=h1)
    assert r.status == 404
    r = await client.post("/v1/vehicles/ZOE-001/unlock", data=b"{not json", headers=h1)
    assert r.status == 400
    for path in ("/v1/vehicles/ZOE-002/unlock", "/v1/vehicles/ZOE-002/lock"):
        r = await client.post(path, json=unknown, headers=h1)
        assert r.status == 429
        assert (await r.json())["error"]["code"] == "rate_limited"
        assert 1 <= int(r.headers["Retry-After"]) <= 20
    # Another key has its own budget; reading is not limited.
    r = await client.post("/v1/vehicles/ZOE-001/unlock", json=unknown, headers=h2)
    assert r.status == 404
    r = await client.get("/v1/vehicles", headers=h1)
    assert r.status == 200


@pytest.mark.integration
async def test_a_revoked_key_is_refused(
    stack: Stack, unique: Unique, tmp_path: Path, aiohttp_client: Callable[..., Any]
) -> None:
    # Revoking = removing the key from api.keys (GATEWAY__API__KEYS) and restarting.
    settings = gateway_settings(
        stack.broker.port, f"http://127.0.0.1:{stack.influx.port}", unique.prefix, unique.database, tmp_path,
        api__keys=[KEY_2],
    )  # fmt: skip
    client = await aiohttp_client(init_app(settings, FLEET))
    for method, path in (("POST", "/v1/vehicles/ZOE-001/unlock"), ("GET", "/v1/vehicles")):
        r = await client.request(
            method, path, json={"reservation_id": "R-1"}, headers={"Authorization": f"Bearer {KEY_1}"}
        )
        assert r.status == 401 and (await r.json())["error"]["code"] == "unauthorized"
    r = await client.get("/v1/vehicles", headers={"Authorization": f"Bearer {KEY_2}"})
    assert r.status == 200


# ---- no key in the logs --------------------------------------------------------------------------------

MASTER = "log-test-master-" + secrets.token_hex(12)
GW_PASSWORD = "log-test-mqtt-" + secrets.token_hex(12)
INFLUX_PASSWORD = "log-test-influx-" + secrets.token_hex(12)


@pytest.fixture
def secure(tmp_path: Path) -> Iterator[SecureBroker]:
    accounts = {"gateway": GW_PASSWORD} | {v: mqtt_password(MASTER, v) for v in FLEET.vehicles}
    b = start_secure_broker(tmp_path / "broker", accounts)
    yield b
    b.stop()


def secrets_and_derivatives() -> dict[str, str]:
    out = {"api key 1": KEY_1, "api key 2": KEY_2, "master key": MASTER, "mqtt password": GW_PASSWORD,
           "influx password": INFLUX_PASSWORD}  # fmt: skip
    for v in FLEET.vehicles:
        k = vehicle_key(MASTER, v)
        out[f"{v} key hex"] = k.hex()
        out[f"{v} key b64"] = base64.b64encode(k).decode()
        out[f"{v} mqtt password"] = mqtt_password(MASTER, v)
    return out


def spawn(config: Path, out: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(out, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway", "--config", str(config), "run"],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
        )  # fmt: skip


@pytest.mark.integration
async def test_no_key_is_ever_logged(secure: SecureBroker, stack: Stack, unique: Unique, tmp_path: Path) -> None:
    http_port = free_port()
    config = {
        "dev_mode": False,
        "log_level": "DEBUG",
        "mqtt": {"host": "127.0.0.1", "port": secure.gateway_port, "username": "gateway", "password": GW_PASSWORD,
                 "client_id": f"gw-{unique.database}"},
        "influx": {"url": f"http://127.0.0.1:{stack.influx.port}", "database": unique.database,
                   "username": "gateway", "password": INFLUX_PASSWORD},
        "journal": {"flush_interval_s": 0.05},
        "http": {"host": "127.0.0.1", "port": http_port},
        "api": {"keys": [KEY_1, KEY_2]},
        "commands": {"master_key": MASTER, "ack_timeout_s": 5},
        "state": {"dir": str(tmp_path / "state")},
        "fleet": {"file": str(REPO / "config" / "fleet.yaml")},
    }  # fmt: skip
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "gateway.out"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONASYNCIODEBUG": "1"}
    proc = spawn(tmp_path / "gateway.yaml", out, env)
    try:
        await async_wait_for(lambda: proc.poll() is not None or port_open(http_port), 20, "the gateway's HTTP port")
        assert proc.poll() is None, out.read_text()
        base = f"http://127.0.0.1:{http_port}"
        good, bad = {"Authorization": f"Bearer {KEY_1}"}, {"Authorization": f"Bearer {KEY_2[:-1]}x"}
        cfg = SimConfig(port=secure.port, prefix="fleet", fleet=FLEET, vehicles=2, master_key=MASTER,
                        per_car_credentials=True, seed=5, start_hour=3.0)  # fmt: skip
        async with SimFleet(cfg) as sim, aiohttp.ClientSession(base) as http:
            await sim.wait_ready(timeout=15)

            async def connected() -> bool:
                async with http.get("/healthz") as r:
                    return r.status == 200 and (await r.json()).get("broker") == "connected"

            await async_wait_for(connected, 20, "the gateway connected to the broker")
            async with http.get("/v1/vehicles", headers=bad) as r:
                assert r.status == 401
            async with http.get("/v1/vehicles/ZOE-001", headers=good) as r:
                assert r.status == 200
            rid = f"R-{uuid.uuid4().hex[:8].upper()}"
            body = {"vehicle_id": "ZOE-001", "user_id": "U-1", "kind": "public",
                    "starts_at": rfc3339_ms(time.time() - 60), "ends_at": rfc3339_ms(time.time() + 3600)}  # fmt: skip
            async with http.put(f"/v1/reservations/{rid}", json=body, headers=good) as r:
                assert r.status == 201, await r.text()
            async with http.post("/v1/vehicles/ZOE-001/unlock", json={"reservation_id": rid}, headers=good) as r:
                assert r.status == 200, await r.text()
            async with http.post("/v1/vehicles/ZOE-002/unlock", json={"reservation_id": rid}, headers=bad) as r:
                assert r.status == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 30)
    text = out.read_text(errors="replace")
    assert "DEBUG" in text and "connected to MQTT broker" in text, text[-2000:]
    leaked = [name for name, value in secrets_and_derivatives().items() if value in text]
    assert not leaked, f"the gateway printed: {leaked}"
    assert f"{KEY_2[:-1]}x" not in text, "a wrong key sent by a caller was printed"
