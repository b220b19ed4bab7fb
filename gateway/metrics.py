"""What the gateway says about itself: ``/metrics``, ``/healthz`` and the `gateway` self-report point.

``/metrics`` follows Prometheus's own conventions through ``prometheus_client``:
``text/plain; version=0.0.4``, durations as histograms in seconds, counters
ending in ``_total``, and a labelled family that has no sample yet shows no
sample at all (never one without its labels). Each app has its own registry,
so two gateways in one test process never share a counter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from gateway.ingest.journal import Journal
from gateway.ingest.lineproto import line
from gateway.ingest.pipeline import IngestStats
from gateway.ingest.writer import WriterStats
from gateway.mqtt.link import LinkStats

__all__ = ["CONTENT_TYPE", "Monitor", "Snapshot", "health", "self_report_line"]

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
# A `_created` series beside every counter is OpenMetrics' idea, not the 0.0.4 format's.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

WRITE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# A car answers in tens of milliseconds; the ack timeout is seconds.
COMMAND_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


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
    alerts_open: dict[str, int] = field(default_factory=dict)  # by type, every type present
    webhook_results: dict[str, int] = field(default_factory=dict)  # delivered, retry, expired, gone
    webhook_backlog: int = 0
    webhooks_disabled: dict[str, str] = field(default_factory=dict)  # url -> why
    reservations_displaced: dict[str, int] = field(default_factory=dict)  # reassigned, cancelled
    links: dict[str, LinkStats] = field(default_factory=dict)  # the MQTT connections: telemetry, commands
    lease_held: bool = True  # this instance runs the once-only work (always, on SQLite)


def health(s: Snapshot) -> tuple[bool, dict[str, Any]]:
    degraded: dict[str, str] = {}
    if not s.broker_connected:
        degraded["broker"] = "not connected to the MQTT broker"
    if not s.writer.healthy:
        degraded["influxdb"] = f"writes failing: {s.writer.last_error[:200]}"
    for name, error in s.dead_tasks.items():
        degraded[f"task {name}"] = f"stopped: {error}"
    refused = [f"{topic} ({why})" for stats in s.links.values() for topic, why in sorted(stats.refused.items())]
    if refused:
        # Connected, yet the broker sends nothing on these: ingest would look idle, not broken.
        degraded["subscriptions"] = ("broker refused: " + ", ".join(refused))[:500]
    if s.webhooks_disabled:
        degraded["webhooks"] = "; ".join(f"{url} {why}" for url, why in sorted(s.webhooks_disabled.items()))[:500]
    j = s.journal
    if j.disk_bytes >= 0.8 * j.max_bytes:
        degraded["buffer"] = f"journal {j.disk_bytes / j.max_bytes:.0%} full"
    body: dict[str, Any] = {
        "status": "ok" if not degraded else "degraded",
        "broker": "connected" if s.broker_connected else "disconnected",
        "influxdb": "ok" if s.writer.healthy else "failing",
        "buffer": {"batches": len(j.segments), "bytes": j.disk_bytes, "max_bytes": j.max_bytes},
        "vehicles_reporting": s.vehicles_reporting,
        "alerts_open": sum(s.alerts_open.values()),
        "webhooks": {"backlog": s.webhook_backlog, "disabled": sorted(s.webhooks_disabled)},
        # Which instance runs start-time unlocks, automatic ends, alert checks and webhooks; not a degradation.
        "lease": "held" if s.lease_held else "standby",
    }
    if degraded:
        body["degraded"] = degraded
    return not degraded, body


def _link_families(links: dict[str, LinkStats]) -> Iterable[Metric]:
    def counter(name: str, help_: str, labels: list[str]) -> CounterMetricFamily:
        return CounterMetricFamily(name.removesuffix("_total"), help_, labels=labels)

    def gauge(name: str, help_: str) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, help_, labels=["link"])

    disconnects = counter("gateway_mqtt_disconnects_total", "Lost MQTT connections, by reason.", ["link", "reason"])
    lost = counter(
        "gateway_mqtt_sessions_lost_total",
        "Reconnections the broker answered without the session we had (its queued messages are gone).",
        ["link"],
    )
    expiry = gauge("gateway_mqtt_session_expiry_granted", "Session expiry the broker grants, in seconds.")
    refused = gauge("gateway_mqtt_subscriptions_refused", "Subscriptions the broker refused.")
    protocol = counter(
        "gateway_mqtt_protocol_errors_total",
        "Packets from the broker refused as malformed (answered with DISCONNECT).",
        ["link"],
    )
    connects_refused = counter(
        "gateway_mqtt_connects_refused_total",
        "Connections the broker refused (CONNACK), by reason.",
        ["link", "reason"],
    )
    publish_refused = counter(
        "gateway_mqtt_publications_refused_total", "Our publications the broker refused (PUBACK).", ["link"]
    )
    for name, st in sorted(links.items()):
        for reason, n in sorted(st.disconnects.items()):
            disconnects.add_metric([name, reason], n)
        for reason, n in sorted(st.connects_refused.items()):
            connects_refused.add_metric([name, reason], n)
        lost.add_metric([name], st.sessions_lost)
        if st.connects:  # before the first CONNACK nothing is granted yet, and 0 would read as "no session"
            expiry.add_metric([name], st.session_expiry_s)
        refused.add_metric([name], len(st.refused))
        protocol.add_metric([name], st.protocol_errors)
        publish_refused.add_metric([name], st.publish_refused)
    yield from (disconnects, connects_refused, lost, expiry, refused, protocol, publish_refused)


def families(s: Snapshot) -> Iterable[Metric]:
    """The counters and gauges of one snapshot, as Prometheus metric families."""
    i, w, j = s.ingest, s.writer, s.journal

    def counter(name: str, help_: str, value: float) -> Metric:
        return CounterMetricFamily(name.removesuffix("_total"), help_, value=value)

    def gauge(name: str, help_: str, value: float) -> Metric:
        return GaugeMetricFamily(name, help_, value=value)

    yield counter("gateway_messages_received_total", "Car messages received.", i.received)
    yield counter("gateway_messages_accepted_total", "Car messages that passed validation.", i.accepted)
    rejected = CounterMetricFamily(
        "gateway_messages_rejected", "Car messages rejected, by reason and kind.", labels=["reason", "kind"]
    )
    for (reason, kind), n in sorted(i.rejected_by.items()):
        rejected.add_metric([reason, kind], n)
    yield rejected
    yield counter("gateway_points_written_total", "Points stored in InfluxDB.", w.points_written)
    yield counter("gateway_points_dropped_total", "Points InfluxDB refused as invalid.", w.points_dropped)
    yield counter("gateway_write_errors_total", "Failed writes to InfluxDB (retried).", w.write_errors)
    yield gauge("gateway_influx_healthy", "1 if the last InfluxDB write succeeded.", int(w.healthy))
    yield gauge("gateway_queue_depth", "Points not yet stored in InfluxDB.", j.pending_points)
    yield gauge("gateway_journal_bytes", "Bytes in the on-disk journal.", j.disk_bytes)
    yield gauge("gateway_journal_max_bytes", "Bound of the on-disk journal.", j.max_bytes)
    yield gauge("gateway_journal_batches", "Sealed batches waiting for InfluxDB.", len(j.segments))
    yield counter("gateway_qos0_dropped_total", "QoS 0 messages dropped while the journal was full.", j.dropped_qos0)
    yield gauge("gateway_broker_connected", "1 if connected to the MQTT broker.", int(s.broker_connected))
    yield counter("gateway_broker_connects_total", "Successful MQTT connections.", s.broker_connects)
    yield from _link_families(s.links)
    yield gauge("gateway_vehicles_reporting", "Cars heard from, saved state included.", s.vehicles_reporting)
    yield gauge("gateway_vehicles_online", "Cars whose last status says online.", s.vehicles_online)
    commands = CounterMetricFamily("gateway_commands", "Commands sent to cars, by result.", labels=["result"])
    for result, n in sorted(s.commands.items()):
        commands.add_metric([result], n)
    yield commands
    alerts = GaugeMetricFamily("gateway_alerts_open", "Alerts open, by type.", labels=["type"])
    for type_, n in sorted(s.alerts_open.items()):
        alerts.add_metric([type_], n)
    yield alerts
    deliveries = CounterMetricFamily(
        "gateway_webhook_deliveries",
        "Webhook delivery attempts, by how they ended: delivered, retry (failed, tried again later), "
        "expired (failed, given up: older than webhooks.max_age_s), gone (410: endpoint disabled).",
        labels=["result"],
    )
    for result, n in sorted(s.webhook_results.items()):
        deliveries.add_metric([result], n)
    yield deliveries
    displaced = CounterMetricFamily(
        "gateway_reservations_displaced",
        "Public reservations a staff reservation moved to another car (reassigned) or cancelled.",
        labels=["action"],
    )
    for action, n in sorted(s.reservations_displaced.items()):
        displaced.add_metric([action], n)
    yield displaced
    yield gauge("gateway_webhook_backlog", "Webhook deliveries not yet made (the outbox).", s.webhook_backlog)
    yield gauge(
        "gateway_lease_held",
        "1 if this instance holds the lease: it runs the start-time unlocks, automatic ends, alert checks "
        "and webhook delivery. Exactly one instance of a shared store shows 1.",
        int(s.lease_held),
    )
    yield counter(
        "gateway_acks_unmatched_total",
        "Car acks for no waiting command: late (after the timeout) or another instance's.",
        s.unmatched_acks,
    )


class _SnapshotCollector:
    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        return families(self.snapshot())


class Monitor:
    """One app's metrics: the histograms the parts observe into, and the snapshot the rest is read from."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.write_duration = Histogram(
            "gateway_write_duration_seconds",
            "Duration of each batch written to InfluxDB.",
            buckets=WRITE_BUCKETS,
            registry=self.registry,
        )
        self.command_duration = Histogram(
            "gateway_command_duration_seconds",
            "From publishing a command to the car's ack (or the timeout).",
            buckets=COMMAND_BUCKETS,
            registry=self.registry,
        )
        self._snapshot: Callable[[], Snapshot] | None = None

    def watch(self, snapshot: Callable[[], Snapshot]) -> None:
        """Start reporting what `snapshot` returns (once the parts it reads exist)."""
        self._snapshot = snapshot
        self.registry.register(_SnapshotCollector(snapshot))

    def snapshot(self) -> Snapshot:
        if self._snapshot is None:
            raise RuntimeError("Monitor.watch() was not called")
        return self._snapshot()

    def render(self) -> bytes:
        return generate_latest(self.registry)


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
