"""The simulator against the real Mosquitto: state, commands, misbehaviour, faults and scale.

Every test watches the broker with its own subscriber on its own topic prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest

from device_sim import Behaviour, Fault, Intervals, SimConfig, SimFleet
from device_sim.commands import parse_time
from device_sim.mqtt import MqttClient
from device_sim.physics import rfc3339_ms
from gateway.fleet import load_fleet
from gateway.signing import sign, vehicle_key
from tests.conftest import Stack, Unique
from tests.helpers import REPO, async_wait_for

pytestmark = pytest.mark.integration

MASTER = "integration-master-key-0123456789"
TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
REFERENCE = load_fleet(REPO / "config" / "fleet.yaml")


class Observer:
    """Everything published under a prefix, in arrival order, with the retain flag."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.msgs: list[tuple[str, bytes]] = []

    def on_message(self, topic: str, payload: bytes) -> None:
        self.msgs.append((topic, payload))

    def raw(self, vid: str, suffix: str) -> list[bytes]:
        topic = f"{self.prefix}/{vid}/{suffix}"
        return [p for t, p in self.msgs if t == topic]

    def docs(self, vid: str, suffix: str) -> list[dict[str, Any]]:
        out = []
        for p in self.raw(vid, suffix):
            try:
                out.append(orjson.loads(p))
            except orjson.JSONDecodeError:
                continue
        return out

    def ack(self, vid: str, command_id: str) -> dict[str, Any] | None:
        return next((d for d in self.docs(vid, "commands/ack") if d.get("command_id") == command_id), None)


ObserverT = TypeVar("ObserverT", bound=Observer)


@contextlib.asynccontextmanager
async def subscribed(obs: ObserverT, port: int) -> AsyncIterator[ObserverT]:
    """`obs` receiving everything under its prefix on the broker at `port`."""
    client = await MqttClient.connect("127.0.0.1", port, f"obs-{uuid.uuid4().hex[:8]}")
    client.on_message = obs.on_message
    await client.subscribe([(f"{obs.prefix}/#", 1)])
    obs.client = client  # type: ignore[attr-defined]
    try:
        yield obs
    finally:
        client.disconnect()
        await asyncio.wait_for(client.closed, 5)


@pytest.fixture
async def observer(stack: Stack, unique: Unique) -> AsyncIterator[Observer]:
    async with subscribed(Observer(unique.prefix), stack.broker.port) as obs:
        yield obs


def config(stack: Stack, unique: Unique, **kw: Any) -> SimConfig:
    kw.setdefault("master_key", MASTER)
    kw.setdefault("seed", 42)
    return SimConfig(host="127.0.0.1", port=stack.broker.port, prefix=unique.prefix, fleet=REFERENCE, **kw)


def command(vid: str, action: str = "unlock", *, expires_in: float = 30.0, signer: str | None = None) -> dict[str, Any]:
    now = time.time()
    cmd: dict[str, Any] = {
        "command_id": str(uuid.uuid4()),
        "vehicle_id": vid,
        "action": action,
        "reservation_id": "R-000123",
        "issued_at": rfc3339_ms(now - max(0.0, -expires_in) - 1),
        "expires_at": rfc3339_ms(now + expires_in),
    }
    cmd["signature"] = sign(cmd, vehicle_key(MASTER, signer or vid))
    return cmd


async def send(obs: Observer, topic_vid: str, cmd: dict[str, Any]) -> dict[str, Any]:
    """Publish a command on the car's topic, return its ack (fails after 5 s without one)."""
    client: MqttClient = obs.client  # type: ignore[attr-defined]
    client.publish(f"{obs.prefix}/{topic_vid}/commands", orjson.dumps(cmd), 1)
    ack: dict[str, Any] = await async_wait_for(lambda: obs.ack(topic_vid, cmd["command_id"]), 5, "the ack")
    return ack


def assert_valid_state(obs: Observer, vid: str) -> None:
    status = obs.docs(vid, "status")[0]
    assert status["online"] is True and isinstance(status["firmware"], str)
    b = obs.docs(vid, "battery")[0]
    assert 0 <= b["soc_pct"] <= 100 and b["range_km"] >= 0 and -40 <= b["temp_c"] <= 85
    assert isinstance(b["charging"], bool) and isinstance(b["plugged"], bool)
    loc = obs.docs(vid, "location")[0]
    assert -90 <= loc["lat"] <= 90 and -180 <= loc["lon"] <= 180 and 0 <= loc["speed_kmh"] <= 250
    assert 0 <= loc["heading_deg"] <= 360 and loc["odometer_km"] >= 0
    d = obs.docs(vid, "doors")[0]
    assert isinstance(d["locked"], bool) and isinstance(d["closed"], bool)
    for doc in (status, b, loc, d):
        assert TS_RE.match(doc["ts"]), doc
        assert abs(parse_time(doc["ts"]) - time.time()) < 60  # type: ignore[operator]


def complete(obs: Observer, ids: list[str]) -> bool:
    return all(all(obs.raw(v, s) for s in ("status", "battery", "location", "doors")) for v in ids)


# ---- state --------------------------------------------------------------------------------------


async def test_all_reference_cars_publish_a_complete_valid_state_quickly(
    stack: Stack, unique: Unique, observer: Observer
) -> None:
    t0 = time.monotonic()
    async with SimFleet(config(stack, unique)) as sim:
        await sim.wait_ready(10)
        ids = list(REFERENCE.vehicles)
        await async_wait_for(lambda: complete(observer, ids), 10, "every car's full state")
        assert time.monotonic() - t0 < 10
        for vid in ids:
            assert_valid_state(observer, vid)
        assert sim.stats.sent >= 4 * len(ids)


async def test_cli_with_defaults_publishes_every_cars_state_and_says_goodbye(
    stack: Stack, unique: Unique, observer: Observer
) -> None:
    argv = [sys.executable, "-m", "device_sim", "--port", str(stack.broker.port), "--prefix", unique.prefix]
    env = {**os.environ, "GATEWAY__COMMANDS__MASTER_KEY": MASTER}
    proc = await asyncio.create_subprocess_exec(
        *argv, "--duration", "60", cwd=REPO, env=env, stderr=asyncio.subprocess.PIPE
    )
    try:
        ids = list(REFERENCE.vehicles)
        await async_wait_for(lambda: complete(observer, ids), 10, "every car's full state from the CLI")
        for vid in ids:
            assert_valid_state(observer, vid)
        ack = await send(observer, "ZOE-001", command("ZOE-001"))  # key taken from the environment
        assert ack["status"] == "done"
    finally:
        proc.terminate()
        _, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 0, err
    await async_wait_for(lambda: all(observer.docs(v, "status")[-1]["online"] is False for v in ids), 5, "offline")


def test_help_explains_every_option() -> None:
    out = subprocess.run([sys.executable, "-m", "device_sim", "--help"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0
    for opt in ("--host", "--port", "--vehicles", "--speed", "--duration", "--prefix", "--fleet", "--seed",
                "--master-key", "--key-file", "--qos", "--no-ack-share", "--fail-share", "--slow-ack-share",
                "--fault", "--connections", "--quiet", "--write-fleet", "--rate"):  # fmt: skip
        assert re.search(rf"^\s+{opt}\b", out.stdout, re.M), opt


def test_write_fleet_writes_a_registry_the_gateway_can_load(tmp_path: Path) -> None:
    path = tmp_path / "fleet-300.yaml"
    argv = [sys.executable, "-m", "device_sim", "--vehicles", "300", "--write-fleet", str(path)]
    subprocess.run(argv, cwd=REPO, check=True, capture_output=True)
    fleet = load_fleet(path)
    assert len(fleet.vehicles) == 300 and "ZOE-017" in fleet.vehicles and "SIM-00300" in fleet.vehicles


# ---- commands -----------------------------------------------------------------------------------


@pytest.fixture
async def sim(stack: Stack, unique: Unique, observer: Observer) -> AsyncIterator[SimFleet]:
    behaviours = {"ZOE-002": Behaviour.NO_ACK, "ZOE-003": Behaviour.FAIL, "ZOE-004": Behaviour.SLOW_ACK}
    async with SimFleet(config(stack, unique, vehicles=6, behaviours=behaviours, slow_ack_s=1.0)) as s:
        await s.wait_ready(10)
        yield s


async def test_a_signed_unlock_is_obeyed_acked_done_and_the_doors_change(sim: SimFleet, observer: Observer) -> None:
    assert sim.doors("ZOE-001") == (True, True)
    t0 = time.monotonic()
    ack = await send(observer, "ZOE-001", command("ZOE-001", "unlock"))
    latency = time.monotonic() - t0
    assert ack["status"] == "done" and ack["locked"] is False and TS_RE.match(ack["ts"])
    assert latency < 0.9, f"ack after {latency * 1000:.0f} ms"  # sooner than the slow car's 1 s (below)
    assert sim.doors("ZOE-001") == (False, True)
    await async_wait_for(lambda: observer.docs("ZOE-001", "doors")[-1]["locked"] is False, 5, "doors unlocked")
    ack = await send(observer, "ZOE-001", command("ZOE-001", "lock"))
    assert (ack["status"], ack["locked"]) == ("done", True)
    await async_wait_for(lambda: observer.docs("ZOE-001", "doors")[-1]["locked"] is True, 5, "doors locked")


async def test_a_forged_command_is_rejected_bad_signature(sim: SimFleet, observer: Observer) -> None:
    cmd = command("ZOE-001")
    cmd["signature"] = sign(cmd, vehicle_key("not-the-master-key-at-all", "ZOE-001"))
    ack = await send(observer, "ZOE-001", cmd)
    assert (ack["status"], ack["reason"]) == ("rejected", "bad_signature")
    assert sim.doors("ZOE-001") == (True, True)


async def test_an_expired_command_is_rejected_expired(sim: SimFleet, observer: Observer) -> None:
    ack = await send(observer, "ZOE-001", command("ZOE-001", expires_in=-5.0))
    assert (ack["status"], ack["reason"]) == ("rejected", "expired")
    assert sim.doors("ZOE-001") == (True, True)


async def test_a_replayed_command_is_rejected_duplicate(sim: SimFleet, observer: Observer) -> None:
    cmd = command("ZOE-001")
    assert (await send(observer, "ZOE-001", cmd))["status"] == "done"
    await send(observer, "ZOE-001", command("ZOE-001", "lock"))
    observer.msgs.clear()  # the replay's ack carries the same command_id
    ack = await send(observer, "ZOE-001", cmd)
    assert (ack["status"], ack["reason"]) == ("rejected", "duplicate")
    assert sim.doors("ZOE-001") == (True, True)  # the replayed unlock did not open the car


async def test_a_command_for_another_vehicle_is_rejected_wrong_vehicle(sim: SimFleet, observer: Observer) -> None:
    ack = await send(observer, "ZOE-001", command("ZOE-005"))  # validly signed, for ZOE-005
    assert (ack["status"], ack["reason"]) == ("rejected", "wrong_vehicle")
    assert sim.doors("ZOE-001") == (True, True) and sim.doors("ZOE-005") == (True, True)


async def test_misbehaving_cars_fail_ack_late_or_not_at_all(sim: SimFleet, observer: Observer) -> None:
    ack = await send(observer, "ZOE-003", command("ZOE-003"))
    assert (ack["status"], ack["reason"]) == ("failed", "door_open")
    assert observer.docs("ZOE-003", "doors")[0]["closed"] is False

    t0 = time.monotonic()
    ack = await send(observer, "ZOE-004", command("ZOE-004"))
    assert ack["status"] == "done" and time.monotonic() - t0 >= 0.9

    silent = command("ZOE-002")
    observer.client.publish(f"{observer.prefix}/ZOE-002/commands", orjson.dumps(silent), 1)  # type: ignore[attr-defined]
    await send(observer, "ZOE-001", command("ZOE-001"))  # sent after: its ack proves the first had time
    await async_wait_for(lambda: sim.stats.unanswered >= 1, 5, "the silent car to get the command")
    assert observer.ack("ZOE-002", silent["command_id"]) is None
    assert sim.doors("ZOE-002") == (True, True)


# ---- faults -------------------------------------------------------------------------------------


async def test_data_faults_send_what_they_claim(sim: SimFleet, observer: Observer) -> None:
    vid = "ZOE-005"
    base = len(observer.raw(vid, "battery"))

    await sim.inject(Fault.MALFORMED, [vid])
    raw = await async_wait_for(lambda: observer.raw(vid, "battery")[base:], 5, "malformed")
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(raw[-1])

    await sim.inject(Fault.OUT_OF_RANGE, [vid])
    await async_wait_for(lambda: observer.docs(vid, "battery")[-1]["soc_pct"] > 100, 5, "soc over 100")

    n = len(observer.raw(vid, "battery"))
    await sim.inject(Fault.DUPLICATE, [vid])
    await async_wait_for(lambda: len(observer.raw(vid, "battery")) > n, 5, "duplicate")
    b = observer.raw(vid, "battery")
    assert b[-1] in b[:-1]  # the very same bytes were sent before

    await sim.inject(Fault.OLD_TS, [vid], old_age_s=3600)
    old = await async_wait_for(lambda: observer.docs(vid, "battery")[-1]["ts"] != orjson.loads(b[-1])["ts"], 5)
    assert old
    age = time.time() - parse_time(observer.docs(vid, "battery")[-1]["ts"])  # type: ignore[operator]
    assert 3590 < age < 3700

    n = len(observer.raw(vid, "battery"))
    await sim.inject(Fault.OUT_OF_ORDER, [vid])
    await async_wait_for(lambda: len(observer.raw(vid, "battery")) >= n + 2, 5, "two messages")
    a, z = (parse_time(d["ts"]) for d in observer.docs(vid, "battery")[-2:])
    assert a is not None and z is not None and 25 < a - z < 35

    await sim.inject(Fault.CLOCK_SKEW, [vid], skew_s=600)
    ack = await send(observer, vid, command(vid, "lock"))
    skew = parse_time(ack["ts"]) - time.time()  # type: ignore[operator]
    assert 590 < skew < 610


async def test_a_dropped_car_goes_offline_then_replays_its_buffer_out_of_order(
    stack: Stack, unique: Unique, observer: Observer
) -> None:
    fast = Intervals(battery_parked_s=0.2)
    async with SimFleet(config(stack, unique, vehicles=3, intervals=fast, reconnect_min_s=0.1)) as sim:
        await sim.wait_ready(10)
        vid = "ZOE-002"
        await sim.inject(Fault.DROP, [vid], offline_s=1.5)
        await async_wait_for(lambda: observer.raw(vid, "status")[-1:] == [b'{"online": false}'], 5, "the will")
        await async_wait_for(lambda: observer.raw(vid, "status")[-1:] != [b'{"online": false}'], 10, "back online")
        await async_wait_for(lambda: len(observer.raw(vid, "battery")) > 20, 5, "the replay")
        # after the second online status: the fresh battery first, then older buffered ones
        idx = max(i for i, (t, p) in enumerate(observer.msgs) if t.endswith(f"{vid}/status") and b"true" in p)
        after = [orjson.loads(p) for t, p in observer.msgs[idx:] if t.endswith(f"{vid}/battery")]
        fresh = parse_time(after[0]["ts"])
        assert fresh is not None
        older = [d for d in after[1:6] if (parse_time(d["ts"]) or fresh) < fresh]
        assert len(older) >= 3, after[:6]
        assert sim.stats.disconnects >= 1 and sim.stats.connected == 3


async def test_a_reconnect_storm_drops_and_brings_back_every_chosen_car(
    stack: Stack, unique: Unique, observer: Observer
) -> None:
    async with SimFleet(config(stack, unique, vehicles=29, reconnect_min_s=0.1)) as sim:
        await sim.wait_ready(10)
        ids = sim.pick(0.5)
        assert len(ids) == 14 or len(ids) == 15
        connects = sim.stats.connects
        await sim.inject(Fault.STORM, ids, offline_s=0.5)
        await async_wait_for(lambda: sim.stats.connects >= connects + len(ids), 10, "every car reconnected")

        def back(vid: str) -> bool:
            statuses = observer.raw(vid, "status")
            return b'{"online": false}' in statuses and orjson.loads(statuses[-1])["online"] is True

        await async_wait_for(lambda: all(back(v) for v in ids), 10, "every chosen car offline, then online")
        others = [v for v in sim.cars if v not in ids]
        assert not any(b'{"online": false}' in observer.raw(v, "status") for v in others)
        assert sim.stats.connected == 29


# ---- scale ----------------------------------------------------------------------------------------


async def test_a_generated_fleet_of_300_cars_connects(stack: Stack, unique: Unique, observer: Observer) -> None:
    async with SimFleet(config(stack, unique, vehicles=300)) as sim:
        await sim.wait_ready(30)
        assert sim.stats.connected == 300 and "SIM-00300" in sim.cars
        ids = list(sim.cars)
        await async_wait_for(lambda: complete(observer, ids), 10, "300 full states")
        assert_valid_state(observer, "SIM-00300")


async def test_multiplexed_cars_report_and_obey_commands(stack: Stack, unique: Unique, observer: Observer) -> None:
    async with SimFleet(config(stack, unique, vehicles=100, connections=3, rate=500.0)) as sim:
        await sim.wait_ready(20)
        assert sim.stats.connects == 3 and sim.stats.connected == 100
        ack = await send(observer, "SIM-00077", command("SIM-00077"))
        assert ack["status"] == "done" and sim.doors("SIM-00077") == (False, True)
        sent = sim.stats.sent
        await async_wait_for(lambda: sim.stats.sent > sent + 400, 5, "the load pump")
