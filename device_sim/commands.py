"""Command verification on the car side, as the contract fixes it. Pure, apart from the replay memory.

A car executes a command only if, in this order of checks:

1. ``vehicle_id`` is its own                       else ``rejected`` / ``wrong_vehicle``
2. the signature verifies with its own key         else ``rejected`` / ``bad_signature``
3. ``command_id`` was not seen before              else ``rejected`` / ``duplicate``
4. ``expires_at`` has not passed                   else ``rejected`` / ``expired``

Only commands that pass 1 and 2 are remembered as seen, so a forged command
cannot burn a real command id.

The key derivation and the signature check below are written from the contract
(docs/car-integration.md) on purpose, independently of ``gateway/signing.py``:
the car side and the gateway side are two implementations, and
tests/test_signature_worked_example.py pins both to the document's worked
example, so a drift on either side fails a test instead of going unnoticed.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

ACTIONS = ("unlock", "lock")
# The signed fields, in the order the contract joins them with "|".
SIGNED_FIELDS = ("command_id", "vehicle_id", "action", "reservation_id", "issued_at", "expires_at")


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


def vehicle_key(master_key: str, vehicle_id: str) -> bytes:
    """A car's command key, as the contract fixes it: HMAC-SHA256(key=master key, msg=vehicle_id), UTF-8, 32 bytes.

    Written from the contract, independently of ``gateway/signing.py``.
    """
    return hmac.new(master_key.encode("utf-8"), vehicle_id.encode("utf-8"), hashlib.sha256).digest()


def signing_string(cmd: Mapping[str, Any]) -> bytes | None:
    """``command_id|vehicle_id|action|reservation_id|issued_at|expires_at`` from the payload's own strings, UTF-8.

    ``null`` (or an absent field) is the empty string. Any other non-string value is outside the contract,
    which signs the payload's exact strings: None then, and such a command never verifies.
    Written from the contract, independently of ``gateway/signing.py``.
    """
    parts: list[str] = []
    for field in SIGNED_FIELDS:
        value = cmd.get(field)
        if value is None:
            parts.append("")
        elif isinstance(value, str):
            parts.append(value)
        else:
            return None
    return "|".join(parts).encode("utf-8")


def signature_is_valid(cmd: Mapping[str, Any], key: bytes) -> bool:
    """Whether ``signature`` is the lowercase hex HMAC-SHA256 of the signing string under `key`; constant-time compare.

    Written from the contract, independently of ``gateway/signing.py``.
    """
    sig = cmd.get("signature")
    msg = signing_string(cmd)
    if not isinstance(sig, str) or msg is None:
        return False
    expected = hmac.new(key, msg, hashlib.sha256).hexdigest()
    # compared as bytes: compare_digest refuses str with non-ASCII characters, and a forged payload may carry them
    return hmac.compare_digest(expected.encode("ascii"), sig.encode("utf-8"))


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
    if key is None or not signature_is_valid(cmd, key):
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
