"""The SQLite store's parts for several gateways on one fleet: leases, the shared latest state of the
cars, claimed idempotency keys.

A store file is one process's, so none of this is contended here as it is on PostgreSQL; it is kept
all the same so that both backends pass one contract (and two stores on one file would be right too:
every write is an ``IMMEDIATE`` transaction, so writers take turns).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import orjson

from gateway.rules.commands import Outcome
from gateway.store.base import IDEMPOTENCY_CLAIM_TTL_MS, Claim, StoredReading, newest_of
from gateway.store.sqlite_sql import SqliteBase, errors

__all__ = ["SharedTables"]


class SharedTables(SqliteBase):
    # -- leases --

    async def take_lease(self, name: str, holder: str, now_ms: int, ttl_ms: int) -> bool:
        # One statement decides: the row is inserted, or updated only if it is ours or has expired.
        with errors("take a lease"), self._tx():
            rows = self.db.execute(
                "INSERT INTO leases (name, holder, expires_ms) VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE "
                "SET holder = excluded.holder, expires_ms = excluded.expires_ms "
                "WHERE leases.holder = excluded.holder OR leases.expires_ms <= ? RETURNING holder",
                (name, holder, now_ms + ttl_ms, now_ms),
            ).fetchall()
        return bool(rows)

    async def release_lease(self, name: str, holder: str) -> None:
        with errors("release a lease"):
            self.db.execute("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder))

    # -- the shared latest state --

    async def put_states(self, readings: Sequence[StoredReading], seen: Mapping[str, int]) -> int:
        rows, last_seen = newest_of(readings, seen)
        if not rows and not last_seen:
            return 0
        with errors("store the vehicle state"), self._tx():
            # Writers take turns (BEGIN IMMEDIATE), so one past the largest change number is beyond every
            # committed one, and the numbers commit in order. A batch that changed nothing leaves no row
            # with its number, which the next batch then takes: it says 0 (no batch of its own), or its
            # writer would skip the other's rows as its own.
            before = self.db.total_changes
            (seq,) = self.db.execute(
                "SELECT max((SELECT coalesce(max(seq), 0) FROM vehicle_readings), "
                "(SELECT coalesce(max(seq), 0) FROM vehicles_seen)) + 1"
            ).fetchone()
            self.db.executemany(
                "INSERT INTO vehicle_readings (vehicle_id, kind, ts_ms, fields, seq) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (vehicle_id, kind) DO UPDATE SET ts_ms = excluded.ts_ms, fields = excluded.fields, "
                "seq = excluded.seq WHERE vehicle_readings.ts_ms <= excluded.ts_ms",
                [(r.vehicle_id, r.kind, r.ts_ms, orjson.dumps(r.fields), seq) for r in rows],
            )
            self.db.executemany(
                "INSERT INTO vehicles_seen (vehicle_id, last_seen_ms, seq) VALUES (?, ?, ?) "
                "ON CONFLICT (vehicle_id) DO UPDATE SET last_seen_ms = excluded.last_seen_ms, seq = excluded.seq "
                "WHERE vehicles_seen.last_seen_ms < excluded.last_seen_ms",
                [(vid, ms, seq) for vid, ms in last_seen.items()],
            )
            changed = self.db.total_changes > before
        return int(seq) if changed else 0

    async def states_changed_since(self, cursor: int, own: int = 0) -> tuple[list[StoredReading], dict[str, int], int]:
        # One statement, so one snapshot: the readings and the times are read as of the same commit.
        with errors("read the vehicle state"):
            rows = self.db.execute(
                "SELECT vehicle_id, kind, ts_ms, fields, seq FROM vehicle_readings WHERE seq > ? AND seq != ? "
                "UNION ALL SELECT vehicle_id, NULL, last_seen_ms, NULL, seq FROM vehicles_seen "
                "WHERE seq > ? AND seq != ?",
                (cursor, own, cursor, own),
            ).fetchall()
        readings = [StoredReading(v, k, int(t), orjson.loads(f)) for v, k, t, f, _ in rows if k is not None]
        seen = {v: int(t) for v, k, t, _, _ in rows if k is None}
        return readings, seen, max(cursor, own, *(int(r[4]) for r in rows))

    # -- claimed idempotency keys --

    async def claim_idempotency_key(
        self, caller: str, key: str, fingerprint: str, holder: str, now_ms: int,
        ttl_ms: int = IDEMPOTENCY_CLAIM_TTL_MS,
    ) -> Claim:  # fmt: skip
        with errors("claim an idempotency key"), self._tx():
            claimed = self.db.execute(
                "INSERT INTO idempotency_claims (caller, key, fingerprint, holder, expires_ms) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (caller, key) DO UPDATE SET fingerprint = excluded.fingerprint, "
                "holder = excluded.holder, expires_ms = excluded.expires_ms "
                "WHERE idempotency_claims.holder = excluded.holder OR idempotency_claims.expires_ms <= ? "
                "RETURNING holder",
                (caller, key, fingerprint, holder, now_ms + ttl_ms, now_ms),
            ).fetchall()
            # Read after claiming: an outcome saved before the claim was free is seen (see postgres_shared.py).
            saved = self.db.execute(
                "SELECT fingerprint, outcome FROM idempotency WHERE caller = ? AND key = ?", (caller, key)
            ).fetchone()
            if saved is not None:
                if claimed:
                    self.db.execute(
                        "DELETE FROM idempotency_claims WHERE caller = ? AND key = ? AND holder = ?",
                        (caller, key, holder),
                    )
                return str(saved[0]), Outcome.from_doc(orjson.loads(saved[1]))
        return "claimed" if claimed else "pending"

    async def release_idempotency_key(self, caller: str, key: str, holder: str) -> None:
        with errors("release an idempotency key"):
            self.db.execute(
                "DELETE FROM idempotency_claims WHERE caller = ? AND key = ? AND holder = ?", (caller, key, holder)
            )
