"""The incident options of the simulator's command line and of the main job (scripts/demo.py), without a broker."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from device_sim import SimConfig, SimFleet
from device_sim.cli import _pid_file, build_parser
from device_sim.incidents import CYCLE, Incidents
from gateway.errors import ConfigError
from gateway.rules.webhooks import decode_secret
from gateway.settings import WebhooksSettings
from scripts import demo


def args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_incidents_are_off_by_default_and_held_a_minute() -> None:
    a = args()
    assert (a.incidents, a.incident_hold, a.pid_file) == (0.0, 60.0, None)
    a = args("--incidents", "120", "--incident-hold", "30", "--pid-file", ".run/device_sim.pid")
    assert (a.incidents, a.incident_hold, a.pid_file) == (120.0, 30.0, Path(".run/device_sim.pid"))


@pytest.mark.parametrize(
    "argv",
    [
        ["--incidents", "-1"],
        ["--incidents", "nan"],
        ["--incidents", "inf"],
        ["--incidents", "soon"],
        ["--incident-hold", "0"],
        ["--incident-hold", "-5"],
    ],
)
def test_bad_incident_options_are_refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        args(*argv)
    assert e.value.code == 2 and argv[0] in capsys.readouterr().err


def test_help_explains_incidents_sigusr1_and_the_pid_file() -> None:
    text = build_parser().format_help()
    for needle in ("--incidents", "--incident-hold", "--pid-file", "SIGUSR1", "kill -USR1", *CYCLE):
        assert needle in text, needle


def test_the_pid_file_holds_our_pid_while_running_and_is_removed_after(tmp_path: Path) -> None:
    path = tmp_path / "run" / "sim.pid"
    with _pid_file(path):
        assert path.read_text().strip() == str(os.getpid())
    assert not path.exists()
    with _pid_file(path):
        path.write_text("1\n")  # another simulator took the file over: it stays theirs
    assert path.read_text() == "1\n"
    with _pid_file(None):
        pass
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="--pid-file"), _pid_file(tmp_path / "file" / "sim.pid"):
        pass


async def test_an_incident_needs_a_free_car_ready_at_its_station() -> None:
    sim = SimFleet(SimConfig(vehicles=3, seed=1))  # not started: no car is ready
    lines: list[str] = []
    incidents = Incidents(sim, say=lines.append)
    assert incidents.start() is None and incidents.start("vehicle_silent") is None
    assert lines == [
        "incident moved_without_trip: no car free for it now (parked at its station, not rented); skipped",
        "incident vehicle_silent: no car free for it now (parked at its station, not rented); skipped",
    ]
    assert incidents.start() is None and lines[-1].startswith(f"incident {CYCLE[1]}:")  # the cycle moved on
    with pytest.raises(ValueError):
        incidents.start("no_such_condition")


# ---- scripts/demo.py ---------------------------------------------------------------------------


def test_demo_options_default_to_incidents_every_two_minutes_and_the_demo_secret() -> None:
    a = demo.build_parser().parse_args([])
    assert (a.webhook, a.webhook_secret, a.incidents, a.incident_hold) == ([], demo.DEMO_WEBHOOK_SECRET, 120.0, 60.0)
    assert len(decode_secret(demo.DEMO_WEBHOOK_SECRET)) == 32  # what the gateway takes
    a = demo.build_parser().parse_args(["--webhook", "http://127.0.0.1:9000/hook", "--webhook", "https://ops.example/x",
                                        "--incidents", "0"])  # fmt: skip
    assert a.webhook == ["http://127.0.0.1:9000/hook", "https://ops.example/x"] and a.incidents == 0


@pytest.mark.parametrize(
    "argv",
    [
        ["--webhook", "ftp://x"],
        ["--webhook", "127.0.0.1:9000"],
        ["--webhook-secret", "not-a-secret"],
        ["--webhook-secret", "whsec_c2hvcnQ="],  # 5 bytes
        ["--incidents", "-1"],
        ["--incident-hold", "0"],
    ],
)
def test_demo_refuses_bad_options(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        demo.build_parser().parse_args(argv)


def test_the_webhook_endpoints_are_what_the_gateway_reads_from_its_variable() -> None:
    raw = demo.webhook_endpoints(["http://127.0.0.1:9000/hook", "http://127.0.0.1:9001/"], demo.DEMO_WEBHOOK_SECRET)
    assert json.loads(raw)[0] == {"url": "http://127.0.0.1:9000/hook", "secret": demo.DEMO_WEBHOOK_SECRET,
                                  "types": ["*"]}  # fmt: skip
    parsed = WebhooksSettings.model_validate({"endpoints": raw})  # as GATEWAY__WEBHOOKS__ENDPOINTS arrives
    assert [e.url for e in parsed.endpoints] == ["http://127.0.0.1:9000/hook", "http://127.0.0.1:9001/"]


def test_the_simulator_gets_the_pid_file_and_the_incidents(tmp_path: Path) -> None:
    pid = tmp_path / "device_sim.pid"
    a = demo.build_parser().parse_args(["--incidents", "90", "--incident-hold", "45"])
    argv = demo.sim_command(a, tmp_path / "fleet.yaml", pid)
    assert argv[argv.index("--pid-file") + 1] == str(pid)
    assert argv[argv.index("--incidents") + 1 :][:3] == ["90", "--incident-hold", "45"]
    parsed = build_parser().parse_args(argv[3:])  # what device_sim makes of it
    assert (parsed.incidents, parsed.incident_hold, parsed.pid_file) == (90.0, 45.0, pid)
    off = demo.sim_command(demo.build_parser().parse_args(["--incidents", "0"]), tmp_path / "f.yaml", pid)
    assert "--incidents" not in off and "--pid-file" in off


def test_alert_thresholds_fit_the_hold_and_the_reporting() -> None:
    t = demo.alert_thresholds(60, 60)
    assert t == {"GATEWAY__ALERTS__UNATTENDED_AFTER_S": "20", "GATEWAY__ALERTS__CHARGING_FAULT_AFTER_S": "20",
                 "GATEWAY__ALERTS__SILENT_AFTER_S": "20"}  # fmt: skip
    assert demo.alert_thresholds(1, 60)["GATEWAY__ALERTS__SILENT_AFTER_S"] == "300"  # a battery report a minute


def test_open_alerts_are_summed_over_their_types_and_shown() -> None:
    text = """# HELP gateway_alerts_open Alerts open, by type.
# TYPE gateway_alerts_open gauge
gateway_alerts_open{type="charging_fault"} 1.0
gateway_alerts_open{type="moved_without_trip"} 2.0
gateway_alerts_open{type="vehicle_silent"} 0.0
gateway_vehicles_online 29.0
gateway_webhook_deliveries_total{result="delivered"} 7.0
"""
    m = demo.parse_metrics(text)
    assert m["gateway_alerts_open"] == 3.0 and m["gateway_webhook_deliveries_total"] == 7.0
    line = demo.summary(m, {}, 2.0, 29, [])
    assert "| alerts 3 |" in line and "online 29/29" in line


def test_displaced_bookings_are_counted_by_action_and_shown() -> None:
    text = """gateway_reservations_displaced_total{action="cancelled"} 1.0
gateway_reservations_displaced_total{action="reassigned"} 4.0
gateway_vehicles_online 29.0
"""
    displaced = demo.labelled(text, "gateway_reservations_displaced_total", "action")
    assert displaced == {"cancelled": 1.0, "reassigned": 4.0}
    assert "| staff moved 4, bumped 1 |" in demo.summary(demo.parse_metrics(text), {}, 2.0, 29, [], displaced)
