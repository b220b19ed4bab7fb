"""Every identifier's pattern, defined once.

Settings, the fleet registry, provisioning, the HTTP API's models and the
OpenAPI document all take their patterns from here, so they cannot drift
apart. Each pattern is written without anchors: Python checks it with
``fullmatch`` (``$`` would let a trailing newline through), and JSON Schema
and pydantic get the anchored form, where ``$`` is the end of the text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = [
    "ALERT_ID",
    "API_KEY_NAME",
    "EVENT_ID",
    "IDEMPOTENCY_KEY",
    "INSTANCE",
    "RESERVATION_ID",
    "VEHICLE_ID",
    "IdPattern",
]


@dataclass(frozen=True)
class IdPattern:
    name: str
    body: str
    describe: str
    _re: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_re", re.compile(self.body))

    @property
    def anchored(self) -> str:
        """For JSON Schema and pydantic, whose ``$`` is the end of the text."""
        return f"^{self.body}$"

    def matches(self, value: object) -> bool:
        return isinstance(value, str) and self._re.fullmatch(value) is not None


VEHICLE_ID = IdPattern("vehicle_id", r"[A-Z0-9][A-Z0-9-]{1,31}", "A-Z, 0-9 and '-', 2 to 32 characters")
RESERVATION_ID = IdPattern(
    "reservation_id", r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}", "1 to 64 characters: letters, digits and . _ : - (not first)"
)
INSTANCE = IdPattern("instance", r"[A-Za-z0-9_.-]{1,64}", "1 to 64 letters, digits and . _ -")
API_KEY_NAME = IdPattern(
    "api key name", r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", "1 to 64 letters, digits and . _ - (not first)"
)
# Printable ASCII only: HTTP lets a header carry other bytes, which would reach the store half-decoded.
IDEMPOTENCY_KEY = IdPattern("Idempotency-Key", r"[ -~]{1,200}", "1 to 200 printable ASCII characters")
# evt_ / alr_ and a ULID (Crockford base 32, 26 characters, the first at most 7).
EVENT_ID = IdPattern("event id", r"evt_[0-7][0-9A-HJKMNP-TV-Z]{25}", "evt_ and 26 characters of Crockford base 32")
ALERT_ID = IdPattern("alert id", r"alr_[0-7][0-9A-HJKMNP-TV-Z]{25}", "alr_ and 26 characters of Crockford base 32")
