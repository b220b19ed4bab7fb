"""Reservations and idempotent answers in SQLite, in the state directory.

The schema is versioned with ``PRAGMA user_version``; :data:`MIGRATIONS`
brings any older file up to date at start-up. Every call is a short local
transaction (well under a millisecond), so it runs on the event loop
instead of a thread pool: one loop, no threads beside it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gateway.errors import ConfigError
from gateway.rules.reservations import Reservation, StartUnlock

MIGRATIONS = [
    # version 1
    """
    CREATE TABLE reservations (
        id TEXT PRIMARY KEY,
        vehicle_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        starts_ms INTEGER NOT NULL,
        ends_ms INTEGER NOT NULL,
        kind TEXT NOT NULL,
        unlock_at_start INTEGER NOT NULL,
        cancelled INTEGER NOT NULL DEFAULT 0,
        created_ms INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL,
        su_status TEXT,
        su_at_ms INTEGER,
        su_command_id TEXT,
        su_reason TEXT
    );
    CREATE INDEX reservations_vehicle ON reservations (vehicle_id, ends_ms);
    CREATE INDEX reservations_due ON reservations (unlock_at_start, su_status, starts_ms);
    CREATE TABLE idempotency (
        key TEXT NOT NULL,
        caller TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        status INTEGER NOT NULL,
        body BLOB NOT NULL,
        created_ms INTEGER NOT NULL,
        PRIMARY KEY (caller, key)
    );
    """,
]

_COLUMNS = (
    "id, vehicle_id, user_id, starts_ms, ends_ms, kind, unlock_at_start, cancelled, created_ms, updated_ms, "
    "su_status, su_at_ms, su_command_id, su_reason"
)


def _row(r: tuple[object, ...]) -> Reservation:
    su = None
    if r[10] is not None:
        su = StartUnlock(str(r[10]), int(r[11]), r[12], r[13])  # type: ignore[call-overload, arg-type]
    return Reservation(
        id=str(r[0]),
        vehicle_id=str(r[1]),
        user_id=str(r[2]),
        starts_ms=int(r[3]),  # type: ignore[call-overload]
        ends_ms=int(r[4]),  # type: ignore[call-overload]
        kind="staff" if r[5] == "staff" else "public",
        unlock_at_start=bool(r[6]),
        cancelled=bool(r[7]),
        created_ms=int(r[8]),  # type: ignore[call-overload]
        updated_ms=int(r[9]),  # type: ignore[call-overload]
        start_unlock=su,
    )


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(path, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self._migrate()
        except sqlite3.DatabaseError as e:
            raise ConfigError(f"state.dir: cannot open {path}: {e}") from e

    def _migrate(self) -> None:
        version = int(self.db.execute("PRAGMA user_version").fetchone()[0])
        if version > len(MIGRATIONS):
            raise ConfigError(f"state.dir: the reservations database is version {version}, newer than this gateway")
        for i, sql in enumerate(MIGRATIONS[version:], start=version + 1):
            # executescript commits on its own, so the transaction is part of the script.
            self.db.executescript(f"BEGIN IMMEDIATE; {sql}; PRAGMA user_version = {i}; COMMIT;")

    @contextmanager
    def _tx(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()

    def get(self, reservation_id: str) -> Reservation | None:
        row = self.db.execute(f"SELECT {_COLUMNS} FROM reservations WHERE id = ?", (reservation_id,)).fetchone()
        return None if row is None else _row(row)

    def of_vehicle(self, vehicle_id: str, ending_after_ms: int) -> list[Reservation]:
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM reservations WHERE vehicle_id = ? AND ends_ms > ? AND NOT cancelled",
            (vehicle_id, ending_after_ms),
        ).fetchall()
        return [_row(r) for r in rows]

    def query(self, vehicle_id: str | None, from_ms: int | None, to_ms: int | None, limit: int) -> list[Reservation]:
        sql = f"SELECT {_COLUMNS} FROM reservations WHERE 1=1"
        args: list[object] = []
        if vehicle_id is not None:
            sql += " AND vehicle_id = ?"
            args.append(vehicle_id)
        if from_ms is not None:
            sql += " AND ends_ms > ?"
            args.append(from_ms)
        if to_ms is not None:
            sql += " AND starts_ms < ?"
            args.append(to_ms)
        sql += " ORDER BY starts_ms, id LIMIT ?"
        args.append(limit)
        return [_row(r) for r in self.db.execute(sql, args).fetchall()]

    def put_checked(self, r: Reservation, now_ms: int) -> Reservation | None:
        """Store `r` unless a live reservation of its car overlaps; return the one that does."""
        from gateway.rules.reservations import conflict

        with self._tx():
            clash = conflict(r, self.of_vehicle(r.vehicle_id, now_ms), now_ms)
            if clash is not None:
                return clash
            self._put(r)
        return None

    def _put(self, r: Reservation) -> None:
        su = r.start_unlock
        self.db.execute(
            f"INSERT OR REPLACE INTO reservations ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                r.id,
                r.vehicle_id,
                r.user_id,
                r.starts_ms,
                r.ends_ms,
                r.kind,
                int(r.unlock_at_start),
                int(r.cancelled),
                r.created_ms,
                r.updated_ms,
                su.status if su else None,
                su.at_ms if su else None,
                su.command_id if su else None,
                su.reason if su else None,
            ),
        )

    def cancel(self, reservation_id: str, now_ms: int) -> None:
        self.db.execute("UPDATE reservations SET cancelled = 1, updated_ms = ? WHERE id = ?", (now_ms, reservation_id))

    def due_start_unlocks(self, now_ms: int) -> list[Reservation]:
        """unlock_at_start reservations whose start has come, not yet handled, still running."""
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM reservations WHERE unlock_at_start = 1 AND su_status IS NULL "
            "AND NOT cancelled AND starts_ms <= ? AND ends_ms > ? ORDER BY starts_ms",
            (now_ms, now_ms),
        ).fetchall()
        return [_row(r) for r in rows]

    def next_start_unlock_ms(self, now_ms: int) -> int | None:
        row = self.db.execute(
            "SELECT min(starts_ms) FROM reservations "
            "WHERE unlock_at_start = 1 AND su_status IS NULL AND NOT cancelled AND ends_ms > ?",
            (now_ms,),
        ).fetchone()
        return None if row[0] is None else int(row[0])

    def interrupted_start_unlocks(self) -> list[Reservation]:
        rows = self.db.execute(f"SELECT {_COLUMNS} FROM reservations WHERE su_status = 'pending'").fetchall()
        return [_row(r) for r in rows]

    def set_start_unlock(self, reservation_id: str, su: StartUnlock | None, only_if_unset: bool = False) -> bool:
        """Record the start unlock; with `only_if_unset`, claim it atomically (False if already claimed)."""
        sql = "UPDATE reservations SET su_status = ?, su_at_ms = ?, su_command_id = ?, su_reason = ? WHERE id = ?"
        if only_if_unset:
            sql += " AND su_status IS NULL"
        values = (su.status, su.at_ms, su.command_id, su.reason) if su else (None, None, None, None)
        cur = self.db.execute(sql, (*values, reservation_id))
        return cur.rowcount == 1

    # -- idempotency --

    def idempotent_answer(self, caller: str, key: str) -> tuple[str, int, bytes] | None:
        row = self.db.execute(
            "SELECT fingerprint, status, body FROM idempotency WHERE caller = ? AND key = ?", (caller, key)
        ).fetchone()
        return None if row is None else (str(row[0]), int(row[1]), bytes(row[2]))

    def save_idempotent_answer(
        self, caller: str, key: str, fingerprint: str, status: int, body: bytes, now_ms: int
    ) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO idempotency VALUES (?,?,?,?,?,?)", (key, caller, fingerprint, status, body, now_ms)
        )
        # Keys are kept a day; a retry comes within minutes.
        self.db.execute("DELETE FROM idempotency WHERE created_ms < ?", (now_ms - 86_400_000,))
