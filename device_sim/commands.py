"""Command verification on the car side, as the contract fixes it. Pure, apart from the replay memory.

A car executes a command only if, in this order of checks:

1. ``vehicle_id`` is its own                       else ``rejected`` / ``wrong_vehicle``
2. the signature verifies with its own key         else ``rejected`` / ``bad_signature``
3. ``command_id`` was not seen before              else ``rejected`` / ``duplicate``
4. ``expires_at`` has not passed                   else ``rejected`` / ``expired``

Only commands that pass 1 and 2 are remembered as seen, so a forged command
cannot burn a real command id. Signatures use ``gateway.signing`` so the car
and the gateway cannot drift apart.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from gateway import signing

ACTIONS = ("unlock", "lock")


@dataclass(frozen=True, slots=True)
class Verdict:
    command_id: str
    ok: bool
    reason: str | None = None  # wrong_vehicle, bad_signature, duplicate, expired
    action: str | None = None


class SeenCommands:
    """The ids of the last `size` commands a car accepted for checking, oldest forgotten first."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, command_id: object) -> bool:
        return command_id in self._ids

    def add(self, command_id: str) -> None:
        self._ids[command_id] = None
        while len(self._ids) > self.size:
            self._ids.popitem(last=False)


def parse_time(value: Any) -> float | None:
    """RFC 3339 string or epoch milliseconds → epoch seconds; None if neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) / 1000.0
    if isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            return None
        return dt.timestamp() if dt.tzinfo else None
    return None


def parse_command(payload: bytes) -> dict[str, Any] | None:
    """The command as a dict, or None when it is not a JSON object with a string ``command_id`` (no ack possible)."""
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("command_id"), str):
        return None
    return doc


def verify_command(cmd: dict[str, Any], vehicle_id: str, key: bytes | None, now: float, seen: SeenCommands) -> Verdict:
    """Check a parsed command; remember its id when it is authentic. `now` is epoch seconds."""
    cid = str(cmd["command_id"])
    if cmd.get("vehicle_id") != vehicle_id:
        return Verdict(cid, False, "wrong_vehicle")
    if key is None or not signing.verify(cmd, key):
        return Verdict(cid, False, "bad_signature")
    if cid in seen:
        return Verdict(cid, False, "duplicate")
    seen.add(cid)
    expires = parse_time(cmd.get("expires_at"))
    if expires is None or expires <= now:
        return Verdict(cid, False, "expired")
    return Verdict(cid, True, action=str(cmd.get("action")))


def ack_payload(command_id: str, status: str, ts: str, reason: str | None = None, locked: bool | None = None) -> bytes:
    doc: dict[str, Any] = {"command_id": command_id, "status": status}
    if reason is not None:
        doc["reason"] = reason
    doc["ts"] = ts
    if locked is not None:
        doc["locked"] = locked
    return orjson.dumps(doc)


def load_key_file(text: str) -> dict[str, bytes]:
    """Parse a key file: one ``VEHICLE_ID HEXKEY`` per line, ``#`` comments; a lone hex key maps to ``*``."""
    keys: dict[str, bytes] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.replace("=", " ").replace(":", " ").split()
        vid, hexkey = ("*", parts[0]) if len(parts) == 1 else (parts[0], parts[1])
        try:
            key = bytes.fromhex(hexkey)
        except ValueError:
            raise ValueError(f"key file line {n}: {hexkey[:8]}… is not a hex key") from None
        if len(key) != 32:
            raise ValueError(f"key file line {n}: a vehicle key is 32 bytes (64 hex digits), got {len(key)}")
        keys[vid] = key
    return keys
