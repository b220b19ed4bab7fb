"""Car credentials: what the person fitting a telematics box types in, and the broker's password file.

Everything a car needs derives from the gateway's master key, each with its own
label, so nothing per car has to be stored and ``provision`` can print it again:

- command key   = HMAC-SHA256(master key, vehicle_id), raw 32 bytes (the contract's
  vehicle key; :func:`gateway.signing.vehicle_key`), given to the car in hex;
- broker user   = the vehicle id (the ACL in ``config/mosquitto/acl`` grants
  ``fleet/%u/...`` by user name);
- broker password = base64url(HMAC-SHA256(master key, "mqtt-password:" + vehicle_id))[:32].

Both are one-way: a car's key or password says nothing about another car's, nor
about the master key. The master key itself is never printed. Pure functions
except :func:`write_passwd_file`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from gateway.ids import VEHICLE_ID
from gateway.signing import vehicle_key

__all__ = [
    "CAR_TOPICS",
    "CarCredentials",
    "car_credentials",
    "mqtt_password",
    "passwd_line",
    "render",
    "write_passwd_file",
]

PASSWORD_LABEL = "mqtt-password:"
PASSWORD_CHARS = 32  # 192 bits: no iteration count makes a guess any cheaper to stop
# Mosquitto 2.0's own default (mosquitto_passwd): each connect checks the hash,
# and a reconnect storm of 10,000 cars must not turn into 10,000 slow hashes.
PBKDF2_ITERATIONS = 101

# (suffix under <prefix>/<vehicle id>/, what the car may do) — as config/mosquitto/acl grants.
CAR_TOPICS = (
    ("battery", "publish"),
    ("location", "publish"),
    ("doors", "publish"),
    ("status", "publish (retained, and the will)"),
    ("commands/ack", "publish"),
    ("commands", "subscribe"),
)


def mqtt_password(master_key: str, vehicle_id: str) -> str:
    """The car's broker password, derived from the master key under its own label."""
    mac = hmac.new(master_key.encode(), (PASSWORD_LABEL + vehicle_id).encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).decode().rstrip("=")[:PASSWORD_CHARS]


def passwd_line(username: str, password: str, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """One line of a Mosquitto 2.0 password file: ``user:$7$<iterations>$<salt>$<PBKDF2-SHA512>``."""
    if ":" in username or "\n" in username or not username:
        raise ValueError("a broker user name cannot be empty or hold ':' or a newline")
    salt = os.urandom(12) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    b64 = base64.b64encode
    return f"{username}:$7${iterations}${b64(salt).decode()}${b64(digest).decode()}"


@dataclass(frozen=True)
class CarCredentials:
    vehicle_id: str
    username: str
    password: str
    command_key_hex: str


def car_credentials(master_key: str, vehicle_id: str) -> CarCredentials:
    if not VEHICLE_ID.matches(vehicle_id):
        raise ValueError(f"{vehicle_id[:40]!r} is not a vehicle id ({VEHICLE_ID.describe})")
    return CarCredentials(
        vehicle_id, vehicle_id, mqtt_password(master_key, vehicle_id), vehicle_key(master_key, vehicle_id).hex()
    )


def render(c: CarCredentials, prefix: str, salt: bytes | None = None) -> str:
    """What ``python -m gateway provision VEHICLE_ID`` prints for one car."""
    topics = "\n".join(f"  {prefix}/{c.vehicle_id}/{suffix:<13} {what}" for suffix, what in CAR_TOPICS)
    return (
        f"vehicle        {c.vehicle_id}\n"
        f"mqtt username  {c.username}\n"
        f"mqtt password  {c.password}\n"
        f"passwd line    {passwd_line(c.username, c.password, salt)}\n"
        f"command key    {c.command_key_hex}\n"
        f"topics (everything else is refused by the broker):\n{topics}\n"
    )


def write_passwd_file(path: Path, lines: Iterable[str]) -> int:
    """Write a password file readable by its owner only, atomically; return the number of accounts."""
    body = [ln for ln in lines]
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("".join(ln + "\n" for ln in body))
    os.replace(tmp, path)
    return len(body)
