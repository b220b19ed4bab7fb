"""scripts/run.sh --instances N: several gateways on one PostgreSQL and one MQTT shared group."""

from __future__ import annotations

import argparse
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from gateway.settings_source import load_settings
from scripts import demo, services
from tests.helpers import REPO


def parse(*argv: str) -> argparse.Namespace:
    return demo.build_parser().parse_args(list(argv))


def test_one_instance_by_default_and_its_environment_is_unchanged(tmp_path: Path) -> None:
    a = parse()
    assert a.instances == 1
    env = {"GATEWAY__HTTP__PORT": "8080", "GATEWAY__STATE__DIR": str(tmp_path / "state")}
    (only,) = demo.gateway_envs(a, env, tmp_path)
    assert only == env and only is not env
    assert "GATEWAY__STORE__URL" not in only and "GATEWAY__MQTT__SHARED_GROUP" not in only


@pytest.mark.parametrize("bad", ["0", "-1", "two", "1.5", str(demo.MAX_INSTANCES + 1)])
def test_instances_must_be_a_small_positive_whole_number(bad: str) -> None:
    with pytest.raises(SystemExit):
        parse("--instances", bad)


def test_each_gateway_gets_its_own_name_port_and_state_and_the_same_store_and_group(tmp_path: Path) -> None:
    a = parse("--instances", "3", "--http-port", "9100")
    url = "postgresql://gateway:pw-0123456789abcdef@127.0.0.1:5999/postgres"
    common = {"GATEWAY__HTTP__PORT": "9100", "GATEWAY__MQTT__CLIENT_ID": "fixed", "GATEWAY__API__KEYS": "demo:k"}
    envs = demo.gateway_envs(a, common, tmp_path, url)
    assert [e["GATEWAY__INSTANCE"] for e in envs] == ["gw1", "gw2", "gw3"]
    assert [e["GATEWAY__HTTP__PORT"] for e in envs] == ["9100", "9101", "9102"]
    assert len({e["GATEWAY__STATE__DIR"] for e in envs}) == 3
    assert envs[0]["GATEWAY__STATE__DIR"] == str(tmp_path / "state")  # the single gateway's, as before
    assert {e["GATEWAY__STORE__URL"] for e in envs} == {url}
    assert {e["GATEWAY__MQTT__SHARED_GROUP"] for e in envs} == {demo.SHARED_GROUP}
    assert all(e["GATEWAY__API__KEYS"] == "demo:k" for e in envs)
    assert common["GATEWAY__HTTP__PORT"] == "9100", "the common environment is left alone"
    # What the gateways make of it: distinct MQTT client ids (a fixed one would be shared), one group.
    settings = [
        load_settings(
            REPO / "config" / "gateway.yaml", environ={k: v for k, v in e.items() if k != "GATEWAY__API__KEYS"}
        )
        for e in envs
    ]
    assert [s.mqtt.client_id for s in settings] == ["fleet-gateway", "fleet-gateway-gw2", "fleet-gateway-gw3"]
    assert {s.mqtt.shared_group for s in settings} == {demo.SHARED_GROUP}
    assert all(s.store.url is not None and s.store.url.get_secret_value() == url for s in settings)
    assert [demo.log_name(i) for i in range(3)] == ["gateway", "gateway-gw2", "gateway-gw3"]
    with pytest.raises(ValueError, match="store URL"):
        demo.gateway_envs(a, common, tmp_path)


def test_several_gateways_metrics_are_combined_and_each_share_shown() -> None:
    gw1 = {"gateway_messages_received_total": 100.0, "gateway_vehicles_online": 29.0, "gateway_influx_healthy": 1.0}
    gw2 = {"gateway_messages_received_total": 60.0, "gateway_vehicles_online": 28.0, "gateway_influx_healthy": 0.0}
    m = demo.combine([gw1, gw2])
    assert m == {"gateway_messages_received_total": 160.0, "gateway_vehicles_online": 29.0,
                 "gateway_influx_healthy": 0.0}  # fmt: skip
    assert demo.combine([]) == {}
    assert demo.received_rate(gw1, {}, 2.0) == 50.0
    line = demo.summary(m, {}, 2.0, 29, [], None, [("gw1", 50.0), ("gw2", 30.0)])
    assert line.startswith("    80 msg/s") and line.endswith("| gw1 50, gw2 30 msg/s") and "FAILING" in line
    assert "msg/s |" in demo.summary(m, {}, 2.0, 29, []) and not demo.summary(m, {}, 2.0, 29, []).endswith("msg/s")


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return int(r.status)
    except (urllib.error.URLError, OSError):
        return 0


def _received(port: int) -> float:
    try:
        m, _ = demo.read_metrics(port)
    except (urllib.error.URLError, OSError):
        return 0.0
    return m.get("gateway_messages_received_total", 0.0)


@pytest.mark.integration
def test_two_instances_really_run_and_share_the_fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Not skipped when a service is missing: CI must run this (the demo says which one to install).
    monkeypatch.setattr(demo, "RUN_DIR", tmp_path / "run")
    http = services.free_port()
    while services.port_open(http + 1):
        http = services.free_port()
    argv = ["--instances", "2", "--http-port", str(http), "--mqtt-port", str(services.free_port()),
            "--influx-port", str(services.free_port()), "--vehicles", "4", "--incidents", "0",
            "--duration", "12"]  # fmt: skip
    result: list[int] = []
    runner = threading.Thread(target=lambda: result.append(demo.main(argv)), daemon=True)
    runner.start()
    try:
        deadline = time.monotonic() + 90
        healthy = received = False
        while time.monotonic() < deadline and runner.is_alive():
            healthy = all(_get(f"http://127.0.0.1:{p}/healthz") == 200 for p in (http, http + 1))
            # The broker splits the cars' messages: each gateway gets some of them.
            received = all(_received(p) > 0 for p in (http, http + 1))
            if healthy and received:
                break
            time.sleep(0.5)
        logs = {f.name: f.read_text(errors="replace")[-1500:] for f in (tmp_path / "run").glob("gateway*.log")}
        assert healthy, f"both gateways answer /healthz; logs: {logs}"
        assert received, f"both gateways receive a share of the fleet; logs: {logs}"
    finally:
        runner.join(120)
    assert result == [0], result
    assert not services.port_open(http) and not services.port_open(http + 1), "the demo stops its gateways"
