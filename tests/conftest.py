"""Shared fixtures: one real Mosquitto, InfluxDB 1.6 and nginx for the whole run, and ejabberd.

They are started from Debian's binaries by ``scripts/services.py`` on free
loopback ports, in a temporary directory. Every test that uses them gets its
own topic prefix and database (``unique``), so tests never see each other's data.

ejabberd (its MQTT 5 module) is the second broker: a test that takes
``any_broker`` runs once against each, so the gateway's connection code is
not tuned to one broker's reading of the specification. It starts only if
such a test runs.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from scripts import services
from scripts.ejabberd import start_ejabberd


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


@dataclass
class Broker:
    """A broker to connect to, with what its login needs."""

    name: str
    service: services.Service
    username: str | None = None
    password: str | None = None

    @property
    def port(self) -> int:
        return self.service.port

    def mqtt(self, **over: object) -> dict[str, object]:
        """`mqtt` settings for a gateway (or a link) on this broker."""
        opts: dict[str, object] = {"host": "127.0.0.1", "port": self.port}
        if self.username is not None:
            opts |= {"username": self.username, "password": self.password}
        return opts | over


@pytest.fixture(scope="session")
def ejabberd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.Service]:
    # Not skipped when missing: scripts/setup.sh installs it, and CI must run these tests.
    service = start_ejabberd(tmp_path_factory.mktemp("ejabberd"))
    yield service
    service.stop()


@pytest.fixture(params=["mosquitto", "ejabberd"])
def any_broker(request: pytest.FixtureRequest, stack: Stack) -> Broker:
    if request.param == "mosquitto":
        return Broker("mosquitto", stack.broker)
    # ejabberd refuses a CONNECT without a user name and a password; anonymous login takes any pair.
    return Broker("ejabberd", request.getfixturevalue("ejabberd"), "gateway", "any-password")
