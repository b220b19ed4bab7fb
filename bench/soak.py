"""A bounded soak: 10,000 simulated cars at 5,000 msg/s for a few minutes; does the gateway stay steady?

Starts its own Mosquitto and InfluxDB (scripts/services.py), the gateway as a
process of its own with a 10,000-car registry, and the simulator (10,000
cars multiplexed over 8 connections, plus ``--rate`` extra battery reports
per second). Every ``--sample-every`` seconds it reads the gateway's
resident memory (``VmRSS`` in ``/proc/PID/status``) and ``/metrics``
(received/accepted/written counters, ``gateway_queue_depth``) and prints a
progress line.

    python -m bench.soak [--minutes 3] [--rate 5000] [--vehicles 10000] [--connections 8]

At the end it prints the rate the gateway achieved against what the
simulator actually sent in the same run (the baseline: the gateway cannot
receive more than was offered), resident memory at the start of the steady
period (after a warm-up) and at the end, the maximum queue depth, and the
points stored in InfluxDB against the messages accepted. The verdict is
"steady" if resident memory grew less than 10 % over the second half and
the queue depth did not trend upward (its mean over the last quarter is not
above that of the second quarter by more than one second of offered load).
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bench.common import MASTER, REPO, broker_and_database, gateway_env, start_gateway
from gateway.fleet import load_fleet
from scripts import services
from scripts.services import service_errors_exit_2

PREFIX = "fleet"
DB = "soak"
MEASUREMENTS = {"battery": "soc_pct", "location": "lat", "doors": "locked", "status": "online"}


@dataclass
class Sample:
    t: float  # seconds since the load started
    rss_kib: int
    received: int
    accepted: int
    rejected: int
    written: int
    queue_depth: int
    sim_sent: int


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def metrics(port: int) -> dict[str, float]:
    """Unlabelled samples, and labelled counters summed by name."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        out[name] = out.get(name, 0.0) + float(value)
    return out


SIM_PROGRESS = re.compile(r"\| (\d+) msgs,")


def sim_sent(log: Path) -> int:
    """Messages the simulator has sent, from its last progress line."""
    found = SIM_PROGRESS.findall(log.read_text(errors="replace")[-4000:])
    return int(found[-1]) if found else 0


def influx_count(port: int, measurement: str, field: str) -> int:
    q = urllib.parse.urlencode({"db": DB, "q": f'SELECT count("{field}") FROM "{measurement}"'})
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/query?{q}", timeout=120) as r:
        body = json.load(r)
    series = body["results"][0].get("series")
    return int(series[0]["values"][0][1]) if series else 0


def wait_until(cond: object, timeout: float, what: str) -> None:
    assert callable(cond)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.2)
    raise SystemExit(f"soak: timed out after {timeout:.0f} s waiting for {what}")


def take(gw_pid: int, http_port: int, sim_log: Path, t0: float) -> Sample:
    m = metrics(http_port)
    return Sample(
        t=time.monotonic() - t0,
        rss_kib=rss_kib(gw_pid),
        received=int(m.get("gateway_messages_received_total", 0)),
        accepted=int(m.get("gateway_messages_accepted_total", 0)),
        rejected=int(m.get("gateway_messages_rejected_total", 0)),
        written=int(m.get("gateway_points_written_total", 0)),
        queue_depth=int(m.get("gateway_queue_depth", 0)),
        sim_sent=sim_sent(sim_log),
    )


def at(samples: list[Sample], t: float) -> Sample:
    """The first sample at or after `t`."""
    return next(s for s in samples if s.t >= t)


def mean(xs: list[int]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def report(args: argparse.Namespace, samples: list[Sample], warmup: float, stored: int, final: Sample) -> bool:
    end = samples[-1]
    start = at(samples, warmup)
    mid = at(samples, (warmup + end.t) / 2)
    span = end.t - start.t
    got = (end.received - start.received) / span
    sent = (end.sim_sent - start.sim_sent) / span
    growth_steady = (end.rss_kib - start.rss_kib) / start.rss_kib
    growth_half = (end.rss_kib - mid.rss_kib) / mid.rss_kib
    steady = [s for s in samples if s.t >= start.t]
    q = len(steady) // 4 or 1
    q2, q4 = mean([s.queue_depth for s in steady[q : 2 * q]]), mean([s.queue_depth for s in steady[-q:]])
    trend_up = q4 > q2 + args.rate
    max_q = max(s.queue_depth for s in samples)
    ok = growth_half < 0.10 and not trend_up
    print(f"\nsoak: {end.t:.0f} s, {args.vehicles} cars over {args.connections} connections, +{args.rate:.0f} msg/s")
    print(f"  steady period: {start.t:.0f}-{end.t:.0f} s (after {warmup:.0f} s of warm-up)")
    print(f"  offered (--rate plus the cars' own reports): the simulator sent {sent:,.0f} msg/s")
    print(f"  achieved: the gateway received {got:,.0f} msg/s = {got / sent:.3f} x what was sent (baseline)")
    print(f"            and {got / args.rate:.3f} x the --rate of {args.rate:,.0f} msg/s")
    print(
        f"  RSS: {start.rss_kib / 1024:.1f} MiB at the start of the steady period, {mid.rss_kib / 1024:.1f} MiB"
        f" half-way, {end.rss_kib / 1024:.1f} MiB at the end: {growth_half:+.1%} over the second half,"
        f" {growth_steady:+.1%} over the steady period"
    )
    print(
        f"  queue depth: max {max_q:,} points; mean {q2:,.0f} in the second quarter, {q4:,.0f} in the last"
        f" ({'rising' if trend_up else 'not rising'})"
    )
    lost = final.accepted - stored
    print(
        f"  stored: {stored:,} points in InfluxDB for {final.accepted:,} messages accepted"
        f" ({stored / final.accepted:.4f}; {final.rejected:,} rejected, {final.received:,} received,"
        f" {final.received - final.accepted - final.rejected} unaccounted, {lost:,} accepted but not stored)"
    )
    print(f"  verdict: {'steady' if ok else 'NOT steady'}")
    return ok


def run(args: argparse.Namespace, work: Path, broker: services.Service, influx: services.Service) -> int:
    fleet_file = work / "fleet.yaml"
    fleet_file.write_text(load_fleet(REPO / "config" / "fleet.yaml").with_generated(args.vehicles).to_yaml())
    http_port = services.free_port()
    env = gateway_env(
        broker.port,
        influx.port,
        http_port,
        work / "state",
        GATEWAY__MQTT__TOPIC_PREFIX=PREFIX,
        GATEWAY__INFLUX__DATABASE=DB,
        GATEWAY__FLEET__FILE=str(fleet_file),
    )
    gw = start_gateway(env, http_port)
    sim_log = work / "sim.log"
    sim: subprocess.Popen[bytes] | None = None
    try:
        argv = [sys.executable, "-m", "device_sim", "--port", str(broker.port), "--prefix", PREFIX]
        argv += ["--fleet", str(fleet_file), "--vehicles", str(args.vehicles), "--connections", str(args.connections)]
        argv += ["--rate", str(args.rate), "--master-key", MASTER, "--seed", "7", "--progress-every", "2"]
        with open(sim_log, "wb") as log:
            sim = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
        t0 = time.monotonic()
        duration = args.minutes * 60
        warmup = max(20.0, duration * 0.15)
        samples: list[Sample] = []
        print(
            "    t   RSS MiB   received   msg/s   sim msg/s   accepted   written   queue",
            flush=True,
        )
        next_t = 0.0
        while True:
            next_t += args.sample_every
            time.sleep(max(0.0, t0 + next_t - time.monotonic()))  # the sampling clock of a benchmark
            if sim.poll() is not None or gw.poll() is not None:
                raise SystemExit(f"soak: {'simulator' if sim.poll() is not None else 'gateway'} exited early")
            s = take(gw.pid, http_port, sim_log, t0)
            prev = samples[-1] if samples else Sample(0, 0, 0, 0, 0, 0, 0, 0)
            dt = s.t - prev.t
            samples.append(s)
            print(
                f"{s.t:5.0f} {s.rss_kib / 1024:9.1f} {s.received:10,} {(s.received - prev.received) / dt:7,.0f}"
                f" {(s.sim_sent - prev.sim_sent) / dt:11,.0f} {s.accepted:10,} {s.written:9,} {s.queue_depth:7,}",
                flush=True,
            )
            if s.t >= duration:
                break
        # Stop the load, then let the gateway take and store everything that was sent.
        sim.send_signal(signal.SIGINT)
        sim.wait(60)
        total_sent = sim_sent(sim_log)

        def drained() -> bool:
            m = metrics(http_port)
            return m["gateway_messages_received_total"] >= total_sent and m["gateway_queue_depth"] == 0

        wait_until(drained, 120, "the gateway to drain")
        final = take(gw.pid, http_port, sim_log, t0)
        stored = sum(influx_count(influx.port, m, f) for m, f in MEASUREMENTS.items())
        ok = report(args, samples, warmup, stored, final)
        return 0 if ok else 1
    finally:
        for p in (sim, gw):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(30)


@service_errors_exit_2
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=3.0, help="length of the load (default 3)")
    p.add_argument("--rate", type=float, default=5000.0, help="extra battery reports per second (default 5000)")
    p.add_argument("--vehicles", type=int, default=10_000, help="simulated cars (default 10000)")
    p.add_argument("--connections", type=int, default=8, help="connections the cars share (default 8)")
    p.add_argument("--sample-every", type=float, default=10.0, help="seconds between samples (default 10)")
    args = p.parse_args(argv)
    with broker_and_database("soak") as (work, broker, influx):
        return run(args, work, broker, influx)


if __name__ == "__main__":
    sys.exit(main())
