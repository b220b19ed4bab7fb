"""Shared fixtures: one real Mosquitto, InfluxDB 1.6 and nginx for the whole run.

They are started from Debian's binaries by ``scripts/services.py`` on free
loopback ports, in a temporary directory. Every test that uses them gets its
own topic prefix and database (``unique``), so tests never see each other's data.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from scripts import services


@dataclass
class Stack:
    broker: services.Service
    influx: services.Service
    v2proxy: services.Service


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("stack")
    broker = services.start_mosquitto(base / "mosquitto")
    influx = services.start_influxd(base / "influxdb")
    proxy = services.start_nginx_v2_proxy(base / "nginx", influx.port)
    yield Stack(broker, influx, proxy)
    for s in (proxy, influx, broker):
        s.stop()


@dataclass
class Unique:
    """Names private to one test."""

    prefix: str
    database: str


@pytest.fixture
def unique() -> Unique:
    tag = uuid.uuid4().hex[:10]
    return Unique(prefix=f"t{tag}/fleet", database=f"t_{tag}")
