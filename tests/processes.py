"""Real processes for fault tests: the gateway as a child process, and a publisher that counts broker acks.

The publisher is paho-mqtt with its network thread (test code, not the
gateway): a persistent session, so that what the broker has not
acknowledged is sent again after a broker restart. "Published" means
PUBACKed by the broker — the point from which the gateway's promise starts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from scripts.services import free_port
from tests.helpers import API_KEY, AUTH, MASTER_KEY, REPO


class GatewayProcess:
    def __init__(self, workdir: Path, broker_port: int, influx_port: int, prefix: str, database: str, **env: str):
        self.workdir = workdir
        self.http_port = free_port()
        self.env = dict(os.environ)
        self.env.update(
            GATEWAY__MQTT__PORT=str(broker_port),
            GATEWAY__MQTT__TOPIC_PREFIX=prefix,
            GATEWAY__MQTT__CLIENT_ID=f"gw-{database}",
            GATEWAY__MQTT__RECONNECT_MAX_S="1",
            GATEWAY__INFLUX__URL=f"http://127.0.0.1:{influx_port}",
            GATEWAY__INFLUX__DATABASE=database,
            GATEWAY__INFLUX__TIMEOUT_S="2",
            GATEWAY__HTTP__PORT=str(self.http_port),
            GATEWAY__STATE__DIR=str(workdir / "state"),
            GATEWAY__JOURNAL__FLUSH_INTERVAL_S="0.05",
            GATEWAY__COMMANDS__MASTER_KEY=MASTER_KEY,
            GATEWAY__API__KEYS=API_KEY,
        )
        self.env.update(env)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.workdir / "gateway.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway"], cwd=REPO, env=self.env, stdout=log, stderr=log
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.health(timeout=0.5) is not None:
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            time.sleep(0.1)
        raise AssertionError("gateway did not answer /healthz within 30 s")

    def health(self, timeout: float = 2) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/healthz", timeout=timeout) as r:
                return dict(json.load(r))
        except urllib.error.HTTPError as e:
            return dict(json.load(e))
        except OSError:
            return None

    def call(
        self, method: str, path: str, body: Mapping[str, object] | None = None, headers: Mapping[str, str] = {}
    ) -> tuple[int, Any]:
        """One JSON call to the gateway's API with the test key: (status, body)."""
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}",
            data=None if body is None else orjson.dumps(body),
            method=method,
            headers={**AUTH, "Content-Type": "application/json", **headers},
        )
        try:
            with urllib.request.urlopen(req, timeout=15) as r:
                return r.status, orjson.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, orjson.loads(e.read())

    def metrics(self) -> dict[str, float]:
        """`/metrics` as {family: sum over its series} and {'family{labels}': that series' value}."""
        out: dict[str, float] = {}
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=2) as r:
            for line in r.read().decode().splitlines():
                if line and not line.startswith("#"):
                    series, _, value = line.rpartition(" ")
                    family = series.split("{")[0]
                    out[family] = out.get(family, 0) + float(value)
                    if series != family:
                        out[series] = float(value)
        return out

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def terminate(self, timeout: float = 30) -> float:
        """SIGTERM; returns how long the gateway took to exit."""
        assert self.proc is not None
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout)
        return time.monotonic() - t0

    def log(self) -> str:
        return (self.workdir / "gateway.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class TrackingPublisher:
    """Publishes QoS 1 messages and counts those the broker acknowledged."""

    def __init__(self, port: int, client_id: str) -> None:
        self.acked = 0  # a count, not a set of mids: packet ids wrap at 65535
        self.sent = 0
        self._lock = threading.Lock()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False, protocol=paho.MQTTv311
        )
        self.client.max_inflight_messages_set(100)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(1, 1)
        self.client.on_publish = self._on_publish
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()

    def _on_publish(self, _c: Any, _u: Any, mid: int, _rc: Any, _p: Any) -> None:
        with self._lock:
            self.acked += 1

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1)
        self.sent += 1

    def wait_all_acked(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self.acked >= self.sent:
                    return self.acked
            time.sleep(0.05)
        raise AssertionError(f"only {self.acked} of {self.sent} messages acknowledged by the broker")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
