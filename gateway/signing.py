"""Command signatures, exactly as the contract fixes them. Pure functions.

vehicle key = HMAC-SHA256(key=master key (UTF-8), msg=vehicle_id (UTF-8)), raw 32 bytes
signature   = hex HMAC-SHA256(key=vehicle key,
                              msg="command_id|vehicle_id|action|reservation_id|issued_at|expires_at")
with ``null`` written as the empty string. The simulator has its own
implementation, written from the contract (``device_sim/commands.py``);
``tests/test_signature_worked_example.py`` pins both to the worked example
of ``docs/car-integration.md``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

SIGNED_FIELDS = ("command_id", "vehicle_id", "action", "reservation_id", "issued_at", "expires_at")


def vehicle_key(master_key: str, vehicle_id: str) -> bytes:
    return hmac.new(master_key.encode(), vehicle_id.encode(), hashlib.sha256).digest()


def signing_string(command: Mapping[str, Any]) -> bytes:
    parts = []
    for f in SIGNED_FIELDS:
        v = command.get(f)
        parts.append("" if v is None else str(v))
    return "|".join(parts).encode()


def sign(command: Mapping[str, Any], key: bytes) -> str:
    return hmac.new(key, signing_string(command), hashlib.sha256).hexdigest()


def verify(command: Mapping[str, Any], key: bytes) -> bool:
    sig = command.get("signature")
    if not isinstance(sig, str):
        return False
    # Bytes, not str: compare_digest refuses non-ASCII strings with a TypeError.
    return hmac.compare_digest(sign(command, key).encode(), sig.encode("utf-8", "replace"))
