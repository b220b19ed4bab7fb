"""A token bucket per API key, for unlock and lock. Pure: the caller passes the time.

Each key may spend ``per_min`` calls in a burst, and gets them back at
``per_min / 60`` a second. A leaked key can then open at most that many cars a
minute before somebody revokes it, instead of the whole fleet at once. Buckets
are keyed by the non-secret key id (``gateway.http.middleware.API_KEY_ID``) of an
authenticated caller, so there are only as many as configured keys: memory stays
bounded whatever callers send.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["RateLimiter"]


@dataclass
class RateLimiter:
    per_min: int
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # key id -> (tokens, at)

    def __post_init__(self) -> None:
        if self.per_min < 1:
            raise ValueError("per_min: at least 1")

    def take(self, key_id: str, now: float) -> float:
        """Spend one call of `key_id` at monotonic time `now`: 0.0 if allowed, else seconds until one is back."""
        rate = self.per_min / 60.0
        tokens, at = self._buckets.get(key_id, (float(self.per_min), now))
        tokens = min(float(self.per_min), tokens + max(0.0, now - at) * rate)
        if tokens >= 1.0:
            self._buckets[key_id] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key_id] = (tokens, now)
        return (1.0 - tokens) / rate

    @staticmethod
    def retry_after(wait_s: float) -> str:
        """The ``Retry-After`` header: whole seconds, rounded up, at least 1."""
        return str(max(1, math.ceil(wait_s)))
