"""Helpers for tests: InfluxQL reads and polling with a deadline (never a bare sleep)."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any


def influx_query(port: int, db: str, q: str) -> list[dict[str, Any]]:
    """Run InfluxQL; return the rows of the first series-set as dicts (with 'name' and tags)."""
    url = f"http://127.0.0.1:{port}/query?" + urllib.parse.urlencode({"db": db, "q": q, "epoch": "ms"})
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.load(r)
    rows: list[dict[str, Any]] = []
    for result in body.get("results", []):
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
