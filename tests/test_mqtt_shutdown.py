"""SIGTERM stops the gateway within 15 s whatever its MQTT links are doing (issue 14).

The hardest case found: two gateways left with one client id take the
session from each other over and over, so their links spend their time
connecting, being kicked (DISCONNECT 0x8E) and backing off. A cancellation
landing just as a connection was lost used to be swallowed with the
keepalive task's own, and the link went on reconnecting after "shutting
down", ignoring any further SIGTERM. Many rounds, each stopping both
instances at a different moment of that loop.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import time
from functools import partial
from pathlib import Path

import pytest

from scripts import services
from tests.conftest import Stack, Unique
from tests.helpers import mosquitto_pub, wait_for
from tests.processes import GatewayProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROUNDS = 6
EXIT_WITHIN_S = 15


def _pair(stack: Stack, unique: Unique, workdir: Path, n: int) -> list[GatewayProcess]:
    gateways = []
    for name in ("a", "b"):
        d = workdir / f"{n}{name}"
        d.mkdir()
        env = {
            "GATEWAY__MQTT__CLIENT_ID": f"twin-{unique.database}",  # the mistake under test: one id for two
            "GATEWAY__MQTT__RECONNECT_MIN_S": "0.05",
            "GATEWAY__MQTT__RECONNECT_MAX_S": "0.3",
            "GATEWAY__INSTANCE": f"gw{name}",
        }
        gateways.append(GatewayProcess(d, stack.broker.port, stack.influx.port, unique.prefix, unique.database, **env))
    return gateways


def _both_taken_over(gateways: list[GatewayProcess]) -> bool:
    # Mosquitto 2.0 closes the older connection without a DISCONNECT 0x8E: it shows as a lost connection.
    return all(gw.log().count("MQTT connection lost") >= 3 for gw in gateways)


def test_sigterm_stops_two_gateways_fighting_over_one_client_id(stack: Stack, unique: Unique, tmp_path: Path) -> None:
    rng = random.Random(14)
    for n in range(ROUNDS):
        gateways = _pair(stack, unique, tmp_path, n)
        try:
            for gw in gateways:
                gw.start()
            wait_for(partial(_both_taken_over, gateways), 20, "both kicked off by the other")
            time.sleep(rng.uniform(0, 0.3))  # a different moment of the loop each round
            first, second = gateways
            assert first.proc is not None and second.proc is not None
            t0 = time.monotonic()
            first.proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            second.proc.send_signal(signal.SIGTERM)
            for gw in gateways:
                assert gw.proc is not None
                try:
                    gw.proc.wait(EXIT_WITHIN_S - (time.monotonic() - t0))
                except subprocess.TimeoutExpired:
                    tail = gw.log()[-2000:]
                    raise AssertionError(f"round {n}: still running after {EXIT_WITHIN_S} s:\n{tail}") from None
                assert gw.proc.returncode == 0, gw.log()[-2000:]
                assert "stopped" in gw.log()
        finally:
            for gw in gateways:
                gw.stop()


def test_a_second_sigterm_exits_at_once_when_shutdown_is_slow(stack: Stack, unique: Unique, tmp_path: Path) -> None:
    influx = services.start_influxd(tmp_path / "influxdb")  # its own, to stop it
    gw = GatewayProcess(tmp_path, stack.broker.port, influx.port, unique.prefix, unique.database)
    gw.start()
    try:
        assert gw.proc is not None
        influx.stop()
        doc = json.dumps({"ts": int(time.time() * 1000), "soc": 50.0, "range_km": 100.0, "charging": False})
        asyncio.run(mosquitto_pub(stack.broker.port, f"{unique.prefix}/ZOE-001/battery", doc))
        wait_for(lambda: gw.metrics().get("gateway_queue_depth", 0) > 0, 10, "a batch InfluxDB cannot take")
        # The first SIGTERM drains to InfluxDB for up to 10 s; the operator's second one does not wait for that.
        gw.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "shutting down" in gw.log(), 5, "shutdown begun")
        t0 = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        gw.proc.wait(5)
        assert time.monotonic() - t0 < 2
        assert gw.proc.returncode == 1
        assert "second stop signal" in gw.log()
    finally:
        gw.stop()
        influx.stop()
