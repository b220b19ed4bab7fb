"""The simulator's settings: one frozen object, built by the CLI or by a test, passed in."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from gateway.fleet import Fleet

DEFAULT_FLEET = Path(__file__).resolve().parent.parent / "config" / "fleet.yaml"


class Behaviour(StrEnum):
    """How a car answers commands."""

    NORMAL = "normal"
    NO_ACK = "no_ack"  # out of coverage: the command arrives, no ack ever leaves
    FAIL = "fail"  # a door is jammed open: every command ends ``failed`` / ``door_open``
    SLOW_ACK = "slow_ack"  # obeys, but acks after ``SimConfig.slow_ack_s``


@dataclass(frozen=True, slots=True)
class Intervals:
    """Reporting intervals in simulated seconds (divided by ``speed`` on the wall clock)."""

    battery_parked_s: float = 60.0
    battery_driving_s: float = 30.0
    location_driving_s: float = 5.0
    location_parked_s: float = 300.0
    doors_s: float = 300.0  # doors also go out on every change


@dataclass(frozen=True)
class SimConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    prefix: str = "fleet"
    fleet: Fleet | None = None  # None: load `fleet_path`
    fleet_path: Path = DEFAULT_FLEET
    vehicles: int | None = None  # grow (Fleet.with_generated) or cut the fleet to this many cars
    speed: float = 1.0
    seed: int | None = None
    start_hour: float = 7.0  # simulated time of day at start
    master_key: str | None = None  # derive each car's own key from it
    keys: Mapping[str, bytes] = field(default_factory=dict)  # or provision keys directly ("*" = every car)
    qos: int = 1
    # Broker login: one account for every car, or (per_car_credentials) each car
    # as itself, user = vehicle id, password derived from master_key like
    # `python -m gateway provision` (gateway/provision.py).
    username: str | None = None
    password: str | None = None
    per_car_credentials: bool = False
    intervals: Intervals = Intervals()
    no_ack_share: float = 0.0
    fail_share: float = 0.0
    slow_ack_share: float = 0.0
    slow_ack_s: float = 3.0
    behaviours: Mapping[str, Behaviour] = field(default_factory=dict)  # per-car overrides of the shares
    connections: int = 0  # 0: one MQTT connection per car; K > 0: cars multiplexed over K connections
    connect_concurrency: int = 256
    keepalive: int = 60
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 5.0
    buffer_size: int = 500  # messages a car keeps while offline, replayed on reconnect
    rate: float = 0.0  # extra load, battery messages/s over the whole fleet; 0 off, inf as fast as possible
    firmware: str = "sim-1.0.0"
    client_id_prefix: str = "sim"
    progress_s: float = 5.0
    quiet: bool = True

    def __post_init__(self) -> None:
        if self.speed <= 0:
            raise ValueError("speed: must be > 0")
        if self.qos not in (0, 1):
            raise ValueError("qos: 0 or 1")
        shares = (self.no_ack_share, self.fail_share, self.slow_ack_share)
        if any(not 0 <= s <= 1 for s in shares) or sum(shares) > 1:
            raise ValueError("misbehaviour shares: each 0..1 and together at most 1")
        if self.connections < 0:
            raise ValueError("connections: 0 (one per car) or more")
        if self.password is not None and self.username is None:
            raise ValueError("password: needs a user name too (MQTT 3.1.1)")
        if self.per_car_credentials:
            if not self.master_key:
                raise ValueError("per-car credentials: each car's password derives from the master key; none given")
            if self.username is not None:
                raise ValueError("per-car credentials: each car logs in as itself; drop the shared user name")
            if self.connections:
                raise ValueError("per-car credentials: a car's account may publish only its own topics, so no "
                                 "multiplexed connections")  # fmt: skip
