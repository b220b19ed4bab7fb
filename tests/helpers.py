"""Helpers for tests: InfluxQL reads and polling with a deadline (never a bare sleep)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any


def influx_query(port: int, db: str, q: str) -> list[dict[str, Any]]:
    """Run InfluxQL; return the rows of the first series-set as dicts (with 'name' and tags)."""
    url = f"http://127.0.0.1:{port}/query?" + urllib.parse.urlencode({"db": db, "q": q, "epoch": "ms"})
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.load(r)
    rows: list[dict[str, Any]] = []
    for result in body.get("results", []):
        if "error" in result and result["error"].startswith("database not found"):
            return []  # the gateway creates it with its first write
        if "error" in result:
            raise AssertionError(f"InfluxQL error for {q!r}: {result['error']}")
        for series in result.get("series", []):
            for values in series["values"]:
                row = dict(zip(series["columns"], values, strict=True))
                row["name"] = series["name"]
                row.update(series.get("tags") or {})
                rows.append(row)
    return rows


def wait_for(cond: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll `cond` until it returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last value: {last!r})")


async def async_wait_for(cond: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = cond()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last value: {last!r})")


REPO = Path(__file__).resolve().parent.parent


def gateway_settings(
    broker_port: int, influx_url: str, prefix: str, database: str, state_dir: Path, **over: Any
) -> Any:
    """Settings for a gateway under test: dev mode, short flush interval, private names."""
    from gateway.settings import Settings

    doc: dict[str, Any] = {
        "dev_mode": True,
        "mqtt": {"host": "127.0.0.1", "port": broker_port, "topic_prefix": prefix, "client_id": f"gw-{database}"},
        "influx": {"url": influx_url, "database": database, "bucket": database},
        "journal": {"flush_interval_s": 0.05},
        "http": {"port": 0},
        "api": {"keys": [API_KEY]},
        "commands": {"master_key": MASTER_KEY, "ack_timeout_s": 3},
        "state": {"dir": str(state_dir)},
        "fleet": {"file": str(REPO / "config" / "fleet.yaml")},
    }
    for dotted, value in over.items():
        section, _, key = dotted.partition("__")
        if key:
            doc.setdefault(section, {})[key] = value
        else:
            doc[section] = value
    return Settings.model_validate(doc)


API_KEY = "test-api-key-0123456789"
MASTER_KEY = "test-master-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


async def mosquitto_pub(port: int, topic: str, *payloads: str | bytes, qos: int = 1) -> None:
    """Publish with Debian's mosquitto_pub, one message per payload (``-l`` reads lines)."""
    proc = await asyncio.create_subprocess_exec(
        "mosquitto_pub",
        "-p",
        str(port),
        "-q",
        str(qos),
        "-t",
        topic,
        "-l",
        stdin=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    data = b"".join((p if isinstance(p, bytes) else p.encode()) + b"\n" for p in payloads)
    _, err = await proc.communicate(data)
    if proc.returncode != 0:
        raise AssertionError(f"mosquitto_pub failed: {err.decode()}")


def make_journal(directory: Path, **kw: Any) -> Any:
    """A journal for unit tests: no fsync, no timer-driven seals, a large bound unless `kw` says otherwise."""
    from gateway.ingest.journal import Journal

    opts: dict[str, Any] = {
        "batch_size": 1000,
        "flush_interval_s": 60.0,
        "max_bytes": 1 << 30,
        "memory_bytes": 1 << 20,
        "fsync": False,
    }
    opts.update(kw)
    return Journal(directory, **opts)


def both_links_up(rt: Parts) -> bool:
    """Both of a gateway's MQTT links connected: telemetry, and commands (which connects on its own)."""
    return bool(rt.link.connected and rt.command_link.connected)


class Parts:
    """A running gateway app's parts, read through its typed keys (for assertions and fault injection)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __getattr__(self, name: str) -> Any:
        from gateway import app as gw
        from gateway.http import keys

        key = {
            "link": gw.LINK,
            "command_link": gw.COMMAND_LINK,
            "lease": gw.LEASE,
            "dispatcher": gw.DISPATCHER,
            "ingest": gw.INGEST,
            "journal": gw.JOURNAL,
            "writer": gw.WRITER,
            "store": gw.STORE,
            "supervisor": gw.SUPERVISOR,
            "start_unlocks": gw.START_UNLOCKS,
            "alerts": gw.ALERTS,
            "deliverer": gw.DELIVERER,
            "events": gw.EVENTS,
            "booking": keys.BOOKING,
            "state": keys.STATE,
            "monitor": keys.MONITOR,
        }.get(name)
        if key is None:
            raise AttributeError(name)
        return self.app[key]


def assert_unedited(migrations: Sequence[tuple[str, Sequence[object]]], released: Mapping[int, str]) -> None:
    """Each released version's steps (SQL, or a function's name) hash as they did when it shipped."""
    for version, digest in released.items():
        _, steps = migrations[version - 1]
        text = "\n".join(s if isinstance(s, str) else getattr(s, "__name__", repr(s)) for s in steps)
        assert hashlib.sha256(text.encode()).hexdigest()[:16] == digest, f"schema version {version} was edited"
