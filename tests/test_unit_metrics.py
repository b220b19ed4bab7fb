"""Unit tests for gateway.metrics: Prometheus text, the health verdict and the self-report point."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from gateway.ingest.journal import Journal
from gateway.ingest.pipeline import IngestStats
from gateway.ingest.writer import WriterStats
from gateway.metrics import CONTENT_TYPE, Monitor, Snapshot, health, self_report_line
from tests.helpers import make_journal as new_journal


def make_journal(directory: Path, max_bytes: int = 1000) -> Journal:
    j: Journal = new_journal(directory, max_bytes=max_bytes)
    return j


def snap(journal: Journal, **kw: Any) -> Snapshot:
    opts: dict[str, Any] = {
        "ingest": IngestStats(),
        "writer": WriterStats(),
        "journal": journal,
        "broker_connected": True,
        "broker_connects": 1,
        "vehicles_reporting": 0,
        "vehicles_online": 0,
        "commands": {},
    }
    opts.update(kw)
    return Snapshot(**opts)


def prometheus(s: Snapshot, monitor: Monitor | None = None) -> str:
    m = monitor or Monitor()
    m.watch(lambda: s)
    return m.render().decode()


def fill(journal: Journal, nbytes: int) -> None:
    journal.append(b"x" * (nbytes - 1) + b"\n")
    assert journal.seal()


SAMPLE = re.compile(
    r'^([a-z_][a-z0-9_]*)(\{([a-z_]+="(?:[^"\\]|\\.)*")(,[a-z_]+="(?:[^"\\]|\\.)*")*\})? (-?[0-9.e+]+)$'
)


def samples(text: str) -> dict[str, float]:
    """Parse exposition text strictly: every non-comment line must be `name{labels} value`."""
    out: dict[str, float] = {}
    for ln in text.splitlines():
        if ln.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) [a-z_][a-z0-9_]* .+$", ln), ln
            continue
        m = SAMPLE.match(ln)
        assert m, f"not a valid sample line: {ln!r}"
        key = ln.rsplit(" ", 1)[0]
        assert key not in out, f"duplicate series {key}"
        out[key] = float(ln.rsplit(" ", 1)[1])
    return out


# --- health -------------------------------------------------------------------------------------------


async def test_health_degraded_by_a_disabled_webhook(tmp_path: Path) -> None:
    ok, body = health(snap(make_journal(tmp_path), webhooks_disabled={"http://h/x": "answered 410 Gone"}))
    assert not ok
    assert body["degraded"]["webhooks"] == "http://h/x answered 410 Gone"
    assert body["webhooks"]["disabled"] == ["http://h/x"]


async def test_health_ok(tmp_path: Path) -> None:
    ok, body = health(snap(make_journal(tmp_path), vehicles_reporting=7))
    assert ok
    assert body == {
        "status": "ok",
        "broker": "connected",
        "influxdb": "ok",
        "buffer": {"batches": 0, "bytes": 0, "max_bytes": 1000},
        "vehicles_reporting": 7,
        "alerts_open": 0,
        "webhooks": {"backlog": 0, "disabled": []},
        "lease": "held",
    }


async def test_health_of_a_standby_instance_is_ok(tmp_path: Path) -> None:
    # Another gateway holds the lease: nothing is wrong with this one.
    ok, body = health(snap(make_journal(tmp_path), lease_held=False))
    assert ok and body["status"] == "ok" and body["lease"] == "standby"


async def test_health_broker_down(tmp_path: Path) -> None:
    ok, body = health(snap(make_journal(tmp_path), broker_connected=False))
    assert not ok
    assert body["status"] == "degraded" and body["broker"] == "disconnected"
    assert set(body["degraded"]) == {"broker"}


async def test_health_influx_failing(tmp_path: Path) -> None:
    w = WriterStats(healthy=False, last_error="ClientConnectorError: refused " + "x" * 500)
    ok, body = health(snap(make_journal(tmp_path), writer=w))
    assert not ok
    assert body["influxdb"] == "failing"
    assert set(body["degraded"]) == {"influxdb"}
    assert "refused" in body["degraded"]["influxdb"]
    assert len(body["degraded"]["influxdb"]) <= 250  # the error is cut


async def test_health_buffer_threshold_is_80_percent(tmp_path: Path) -> None:
    j = make_journal(tmp_path, max_bytes=1000)
    fill(j, 799)
    ok, _ = health(snap(j))
    assert ok
    fill(j, 1)
    ok, body = health(snap(j))
    assert not ok
    assert set(body["degraded"]) == {"buffer"}
    assert "80%" in body["degraded"]["buffer"]
    assert body["buffer"] == {"batches": 2, "bytes": 800, "max_bytes": 1000}


async def test_health_everything_degraded(tmp_path: Path) -> None:
    j = make_journal(tmp_path, max_bytes=100)
    fill(j, 100)
    ok, body = health(snap(j, broker_connected=False, writer=WriterStats(healthy=False, last_error="e")))
    assert not ok
    assert set(body["degraded"]) == {"broker", "influxdb", "buffer"}


# --- prometheus ---------------------------------------------------------------------------------------


async def test_prometheus_empty_is_valid_and_complete(tmp_path: Path) -> None:
    text = prometheus(snap(make_journal(tmp_path)))
    assert text.endswith("\n")
    s = samples(text)
    for name in (
        "gateway_messages_received_total",
        "gateway_messages_accepted_total",
        "gateway_points_written_total",
        "gateway_points_dropped_total",
        "gateway_write_errors_total",
        "gateway_write_duration_seconds_count",
        "gateway_command_duration_seconds_count",
        "gateway_influx_healthy",
        "gateway_queue_depth",
        "gateway_journal_bytes",
        "gateway_journal_max_bytes",
        "gateway_journal_batches",
        "gateway_qos0_dropped_total",
        "gateway_broker_connected",
        "gateway_broker_connects_total",
        "gateway_vehicles_reporting",
        "gateway_vehicles_online",
        "gateway_lease_held",
    ):
        assert name in s, name
        family = name.removesuffix("_count")
        assert f"# TYPE {family} " in text and f"# HELP {family} " in text
    # A labelled family with nothing to count yet is declared, with no sample (never an unlabelled one).
    for family in ("gateway_messages_rejected_total", "gateway_commands_total"):
        assert f"# TYPE {family} counter" in text
        assert not [k for k in s if k.startswith(family)], family
    assert s["gateway_influx_healthy"] == 1
    assert s["gateway_broker_connected"] == 1
    assert s["gateway_journal_max_bytes"] == 1000


async def test_prometheus_types(tmp_path: Path) -> None:
    text = prometheus(snap(make_journal(tmp_path)))
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    for name, kind in types.items():
        if name.endswith("_seconds"):
            assert kind == "histogram", name
        else:
            assert kind in ("counter", "gauge"), name
    samples_ = samples(text)
    for key in samples_:
        name = key.split("{")[0]
        family = re.sub(r"_(bucket|count|sum)$", "", name)
        assert name.endswith("_total") == (types[family] == "counter"), name


def test_content_type_is_prometheus_0_0_4() -> None:
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")


async def test_durations_are_histograms_in_seconds(tmp_path: Path) -> None:
    m = Monitor()
    m.write_duration.observe(0.003)
    m.write_duration.observe(0.2)
    m.command_duration.observe(0.012)
    s = samples(prometheus(snap(make_journal(tmp_path)), m))
    assert s["gateway_write_duration_seconds_count"] == 2
    assert s["gateway_write_duration_seconds_sum"] == pytest.approx(0.203)
    assert s['gateway_write_duration_seconds_bucket{le="0.005"}'] == 1
    assert s['gateway_write_duration_seconds_bucket{le="+Inf"}'] == 2
    assert s['gateway_command_duration_seconds_bucket{le="0.01"}'] == 0
    assert s['gateway_command_duration_seconds_bucket{le="0.025"}'] == 1


def test_two_monitors_share_nothing(tmp_path: Path) -> None:
    a, b = Monitor(), Monitor()
    a.command_duration.observe(1.0)
    assert samples(prometheus(snap(make_journal(tmp_path)), b))["gateway_command_duration_seconds_count"] == 0


async def test_prometheus_values(tmp_path: Path) -> None:
    j = make_journal(tmp_path)
    fill(j, 100)
    j.append(b"a 1 1\n")  # one open point
    j.dropped_qos0 = 4
    ingest = IngestStats(received=10, accepted=7, rejected=3)
    ingest.rejected_by[("bad_json", "battery")] = 2
    ingest.rejected_by[("unknown_vehicle", "unknown")] = 1
    w = WriterStats(points_written=5, points_dropped=1, write_errors=2, last_latency_ms=12.5, healthy=False)
    s = samples(
        prometheus(
            snap(
                j,
                ingest=ingest,
                writer=w,
                broker_connected=False,
                broker_connects=3,
                vehicles_reporting=20,
                vehicles_online=18,
                commands={"done": 4, "timeout": 1},
                lease_held=False,
            )
        )
    )
    assert s["gateway_messages_received_total"] == 10
    assert s["gateway_messages_accepted_total"] == 7
    assert s['gateway_messages_rejected_total{kind="battery",reason="bad_json"}'] == 2
    assert s['gateway_messages_rejected_total{kind="unknown",reason="unknown_vehicle"}'] == 1
    assert "gateway_messages_rejected_total" not in s  # no unlabelled zero once there are labelled series
    assert s["gateway_points_written_total"] == 5
    assert s["gateway_points_dropped_total"] == 1
    assert s["gateway_write_errors_total"] == 2
    assert s["gateway_influx_healthy"] == 0
    assert s["gateway_queue_depth"] == 2  # one sealed point, one open
    assert s["gateway_journal_bytes"] == 100
    assert s["gateway_journal_batches"] == 1
    assert s["gateway_qos0_dropped_total"] == 4
    assert s["gateway_broker_connected"] == 0
    assert s["gateway_broker_connects_total"] == 3
    assert s["gateway_vehicles_reporting"] == 20
    assert s["gateway_vehicles_online"] == 18
    assert s["gateway_lease_held"] == 0
    assert s['gateway_commands_total{result="done"}'] == 4
    assert s['gateway_commands_total{result="timeout"}'] == 1


async def test_prometheus_label_escaping(tmp_path: Path) -> None:
    ingest = IngestStats()
    ingest.rejected_by[('we"ird\\re\nason', "ack")] = 1
    text = prometheus(snap(make_journal(tmp_path), ingest=ingest))
    assert 'gateway_messages_rejected_total{kind="ack",reason="we\\"ird\\\\re\\nason"} 1.0' in text
    samples(text)


# --- self report --------------------------------------------------------------------------------------


async def test_self_report_line(tmp_path: Path) -> None:
    j = make_journal(tmp_path)
    j.append(b"a 1 1\n")
    j.append(b"a 1 2\n")
    ingest = IngestStats(received=10, accepted=7, rejected=3)
    out = self_report_line(snap(j, ingest=ingest, writer=WriterStats(last_latency_ms=3.25)), "gw-1", 1795683600123)
    assert out == (
        b"gateway,instance=gw-1 received=10.0,accepted=7.0,rejected=3.0,queue_depth=2.0,write_latency_ms=3.25"
        b" 1795683600123\n"
    )


@pytest.mark.parametrize("instance", ["gw1", "gw.a_b-2"])
async def test_self_report_values_are_floats(tmp_path: Path, instance: str) -> None:
    out = self_report_line(snap(make_journal(tmp_path)), instance, 1).decode()
    head, values, ts = out.rstrip("\n").split(" ")
    assert head == f"gateway,instance={instance}" and ts == "1"
    for kv in values.split(","):
        _, v = kv.split("=")
        assert not v.endswith("i") and "." in v  # never an integer field: no type conflicts with earlier floats


def test_unmatched_acks_are_a_metric(tmp_path: Path) -> None:
    text = prometheus(snap(make_journal(tmp_path), unmatched_acks=3))
    assert "gateway_acks_unmatched_total 3.0" in text
