"""Counters as Prometheus text, the `gateway` self-report point, and the health verdict."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.ingest.journal import Journal
from gateway.ingest.lineproto import line
from gateway.ingest.pipeline import IngestStats
from gateway.ingest.writer import WriterStats


@dataclass
class Snapshot:
    """What the gateway knows about itself at one moment."""

    ingest: IngestStats
    writer: WriterStats
    journal: Journal
    broker_connected: bool
    broker_connects: int
    vehicles_reporting: int
    vehicles_online: int
    commands: dict[str, int]
    unmatched_acks: int = 0
    dead_tasks: dict[str, str] = field(default_factory=dict)


def health(s: Snapshot) -> tuple[bool, dict[str, Any]]:
    degraded: dict[str, str] = {}
    if not s.broker_connected:
        degraded["broker"] = "not connected to the MQTT broker"
    if not s.writer.healthy:
        degraded["influxdb"] = f"writes failing: {s.writer.last_error[:200]}"
    for name, error in s.dead_tasks.items():
        degraded[f"task {name}"] = f"stopped: {error}"
    j = s.journal
    if j.disk_bytes >= 0.8 * j.max_bytes:
        degraded["buffer"] = f"journal {j.disk_bytes / j.max_bytes:.0%} full"
    body: dict[str, Any] = {
        "status": "ok" if not degraded else "degraded",
        "broker": "connected" if s.broker_connected else "disconnected",
        "influxdb": "ok" if s.writer.healthy else "failing",
        "buffer": {"batches": len(j.segments), "bytes": j.disk_bytes, "max_bytes": j.max_bytes},
        "vehicles_reporting": s.vehicles_reporting,
    }
    if degraded:
        body["degraded"] = degraded
    return not degraded, body


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus(s: Snapshot) -> str:
    out: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[dict[str, str], float]]) -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lab = ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items())
            out.append(f"{name}{{{lab}}} {value}" if lab else f"{name} {value}")

    i, w, j = s.ingest, s.writer, s.journal
    metric("gateway_messages_received_total", "counter", "Car messages received.", [({}, i.received)])
    metric("gateway_messages_accepted_total", "counter", "Car messages that passed validation.", [({}, i.accepted)])
    metric(
        "gateway_messages_rejected_total",
        "counter",
        "Car messages rejected, by reason and kind.",
        [({"reason": r, "kind": k}, n) for (r, k), n in sorted(i.rejected_by.items())] or [({}, 0)],
    )
    metric("gateway_points_written_total", "counter", "Points stored in InfluxDB.", [({}, w.points_written)])
    metric("gateway_points_dropped_total", "counter", "Points InfluxDB refused as invalid.", [({}, w.points_dropped)])
    metric("gateway_write_errors_total", "counter", "Failed writes to InfluxDB (retried).", [({}, w.write_errors)])
    metric("gateway_write_latency_ms", "gauge", "Duration of the last InfluxDB write.", [({}, w.last_latency_ms)])
    metric("gateway_influx_healthy", "gauge", "1 if the last InfluxDB write succeeded.", [({}, int(w.healthy))])
    metric("gateway_queue_depth", "gauge", "Points not yet stored in InfluxDB.", [({}, j.pending_points)])
    metric("gateway_journal_bytes", "gauge", "Bytes in the on-disk journal.", [({}, j.disk_bytes)])
    metric("gateway_journal_max_bytes", "gauge", "Bound of the on-disk journal.", [({}, j.max_bytes)])
    metric("gateway_journal_batches", "gauge", "Sealed batches waiting for InfluxDB.", [({}, len(j.segments))])
    metric(
        "gateway_qos0_dropped_total",
        "counter",
        "QoS 0 messages dropped while the journal was full.",
        [({}, j.dropped_qos0)],
    )
    metric("gateway_broker_connected", "gauge", "1 if connected to the MQTT broker.", [({}, int(s.broker_connected))])
    metric("gateway_broker_connects_total", "counter", "Successful MQTT connections.", [({}, s.broker_connects)])
    reporting: list[tuple[dict[str, str], float]] = [({}, s.vehicles_reporting)]
    metric("gateway_vehicles_reporting", "gauge", "Cars heard from, saved state included.", reporting)
    metric("gateway_vehicles_online", "gauge", "Cars whose last status says online.", [({}, s.vehicles_online)])
    metric(
        "gateway_commands_total",
        "counter",
        "Commands sent to cars, by result.",
        [({"result": r}, n) for r, n in sorted(s.commands.items())] or [({}, 0)],
    )
    metric(
        "gateway_acks_unmatched_total",
        "counter",
        "Car acks for no waiting command: late (after the timeout) or another instance's.",
        [({}, s.unmatched_acks)],
    )
    return "\n".join(out) + "\n"


def self_report_line(s: Snapshot, instance: str, ts_ms: int) -> bytes:
    """The `gateway` measurement point written every 10 s."""
    values = {
        "received": float(s.ingest.received),
        "accepted": float(s.ingest.accepted),
        "rejected": float(s.ingest.rejected),
        "queue_depth": float(s.journal.pending_points),
        "write_latency_ms": float(s.writer.last_latency_ms),
    }
    return line("gateway", {"instance": instance}, values, ts_ms)
