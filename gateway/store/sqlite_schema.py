"""The SQLite store's schema, versioned with ``PRAGMA user_version``.

:data:`MIGRATIONS` is the list of versions, oldest first; :func:`migrate`
brings a file of any older version up to date at start-up, each version in
a transaction of its own. A version, once released, is never edited: a
change is a new version.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from gateway.errors import StartupError

__all__ = ["MIGRATIONS", "migrate"]


def _idempotency_as_outcomes(db: sqlite3.Connection) -> None:
    """Version 1 kept the HTTP answer under the key's hash; version 2 keeps the outcome under the key's name.

    An old row cannot be matched to a name (the store never sees the keys), so the old rows are
    dropped: they live a day at most, and a retry across the upgrade is taken as a new request.
    """
    db.execute("DROP TABLE idempotency")
    db.execute(
        "CREATE TABLE idempotency (caller TEXT NOT NULL, key TEXT NOT NULL, fingerprint TEXT NOT NULL, "
        "outcome BLOB NOT NULL, created_ms INTEGER NOT NULL, PRIMARY KEY (caller, key))"
    )


Migration = str | Callable[[sqlite3.Connection], None]

MIGRATIONS: list[tuple[str, list[Migration]]] = [
    (
        "reservations and idempotent answers",
        [
            """CREATE TABLE reservations (
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
            )""",
            "CREATE INDEX reservations_vehicle ON reservations (vehicle_id, ends_ms)",
            "CREATE INDEX reservations_due ON reservations (unlock_at_start, su_status, starts_ms)",
            """CREATE TABLE idempotency (
                key TEXT NOT NULL,
                caller TEXT NOT NULL,
                fingerprint TEXT NOT NULL,
                status INTEGER NOT NULL,
                body BLOB NOT NULL,
                created_ms INTEGER NOT NULL,
                PRIMARY KEY (caller, key)
            )""",
        ],
    ),
    (
        "the command audit, who created a reservation, idempotent outcomes",
        [
            "ALTER TABLE reservations ADD COLUMN created_by TEXT",
            """CREATE TABLE commands (
                command_id TEXT PRIMARY KEY,
                vehicle_id TEXT NOT NULL,
                action TEXT NOT NULL,
                reservation_id TEXT,
                caller TEXT NOT NULL,
                source TEXT NOT NULL,
                issued_ms INTEGER NOT NULL,
                result TEXT NOT NULL,
                reason TEXT,
                latency_ms REAL
            )""",
            "CREATE INDEX commands_vehicle ON commands (vehicle_id, issued_ms)",
            "CREATE INDEX commands_issued ON commands (issued_ms)",
            _idempotency_as_outcomes,
        ],
    ),
    (
        "trips, and reservations whose rental has ended",
        [
            "ALTER TABLE reservations ADD COLUMN completed INTEGER NOT NULL DEFAULT 0",
            """CREATE TABLE trips (
                reservation_id TEXT PRIMARY KEY,
                vehicle_id TEXT NOT NULL,
                user_id TEXT NOT NULL,
                kind TEXT NOT NULL,
                station TEXT NOT NULL,
                booked_start_ms INTEGER NOT NULL,
                booked_end_ms INTEGER NOT NULL,
                started_ms INTEGER NOT NULL,
                start_odometer_km REAL,
                start_soc_pct REAL,
                ended_ms INTEGER,
                ended_by TEXT,
                forced INTEGER NOT NULL DEFAULT 0,
                end_odometer_km REAL,
                end_soc_pct REAL,
                end_at_station INTEGER,
                distance_km REAL,
                energy_kwh REAL,
                duration_min REAL,
                late_min REAL,
                billed_min INTEGER,
                amount_cents INTEGER,
                month TEXT
            )""",
            "CREATE INDEX trips_started ON trips (started_ms)",
            "CREATE INDEX trips_vehicle ON trips (vehicle_id, started_ms)",
            "CREATE INDEX trips_user ON trips (user_id, started_ms)",
            "CREATE INDEX trips_running ON trips (booked_end_ms) WHERE ended_ms IS NULL",
            # The usage statement: a month's users in order, and each car's month kept summed as trips end.
            # Covering: the statement's per-user sums read the index alone, in user order.
            "CREATE INDEX trips_month_user ON trips "
            "(month, user_id, kind, started_ms, billed_min, distance_km, amount_cents, station)",
            """CREATE TABLE usage_cars (
                month TEXT NOT NULL,
                vehicle_id TEXT NOT NULL,
                station TEXT NOT NULL,
                kind TEXT NOT NULL,
                trips INTEGER NOT NULL,
                duration_min REAL NOT NULL,
                distance_km REAL NOT NULL,
                energy_kwh REAL NOT NULL,
                amount_cents INTEGER NOT NULL,
                PRIMARY KEY (month, vehicle_id, station, kind)
            )""",
        ],
    ),
    (
        "events, the webhook outbox and alerts",
        [
            # id is a ULID: ordered as recorded, so listing after an id is a range on the key, and so is
            # pruning by age. One B-tree (WITHOUT ROWID) and one index: a row is written for every command.
            """CREATE TABLE events (
                id TEXT PRIMARY KEY,
                type TEXT NOT NULL,
                ts_ms INTEGER NOT NULL,
                body BLOB NOT NULL
            ) WITHOUT ROWID""",
            "CREATE INDEX events_type ON events (type, id)",
            # One row per event and endpoint that wants it; 'pending' until delivered or given up.
            """CREATE TABLE deliveries (
                event_id TEXT NOT NULL,
                endpoint TEXT NOT NULL,
                state TEXT NOT NULL DEFAULT 'pending',
                attempts INTEGER NOT NULL DEFAULT 0,
                due_ms INTEGER NOT NULL,
                last_error TEXT,
                done_ms INTEGER,
                PRIMARY KEY (event_id, endpoint)
            )""",
            "CREATE INDEX deliveries_due ON deliveries (endpoint, due_ms) WHERE state = 'pending'",
            # reservation_id '' for an alert about the car alone, so that the unique index below holds.
            """CREATE TABLE alerts (
                id TEXT PRIMARY KEY,
                type TEXT NOT NULL,
                vehicle_id TEXT NOT NULL,
                reservation_id TEXT NOT NULL DEFAULT '',
                opened_ms INTEGER NOT NULL,
                resolved_ms INTEGER,
                message TEXT NOT NULL,
                details BLOB NOT NULL
            )""",
            # At most one open alert per type, car and reservation, whatever the callers do.
            "CREATE UNIQUE INDEX alerts_open ON alerts (type, vehicle_id, reservation_id) WHERE resolved_ms IS NULL",
            "CREATE INDEX alerts_vehicle ON alerts (vehicle_id, opened_ms)",
            "CREATE INDEX alerts_opened ON alerts (opened_ms)",
        ],
    ),
    (
        "why a reservation was cancelled",
        [
            "ALTER TABLE reservations ADD COLUMN cancel_reason TEXT",
            # Every cancellation before this version was a DELETE.
            "UPDATE reservations SET cancel_reason = 'cancelled' WHERE cancelled",
        ],
    ),
    (
        "leases, the shared latest state of the cars, claimed idempotency keys",
        [
            # One row per piece of work done once across instances; free once expires_ms has passed.
            "CREATE TABLE leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_ms INTEGER NOT NULL)",
            # The newest reading per car and kind; seq is the change number of the write that last changed it.
            """CREATE TABLE vehicle_readings (
                vehicle_id TEXT NOT NULL,
                kind TEXT NOT NULL,
                ts_ms INTEGER NOT NULL,
                fields BLOB NOT NULL,
                seq INTEGER NOT NULL,
                PRIMARY KEY (vehicle_id, kind)
            )""",
            "CREATE INDEX vehicle_readings_seq ON vehicle_readings (seq)",
            "CREATE TABLE vehicles_seen (vehicle_id TEXT PRIMARY KEY, last_seen_ms INTEGER NOT NULL, "
            "seq INTEGER NOT NULL)",
            "CREATE INDEX vehicles_seen_seq ON vehicles_seen (seq)",
            # A request under way with its Idempotency-Key, beside (not in) the outcomes: an outcome row always
            # has its outcome, and a claim ends when its outcome is saved or when it expires.
            """CREATE TABLE idempotency_claims (
                caller TEXT NOT NULL,
                key TEXT NOT NULL,
                fingerprint TEXT NOT NULL,
                holder TEXT NOT NULL,
                expires_ms INTEGER NOT NULL,
                PRIMARY KEY (caller, key)
            )""",
        ],
    ),
]


def migrate(db: sqlite3.Connection) -> None:
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    if version > len(MIGRATIONS):
        raise StartupError(f"the database is at schema version {version}, newer than this gateway knows")
    for i, (_, steps) in enumerate(MIGRATIONS[version:], start=version + 1):
        db.execute("BEGIN IMMEDIATE")
        try:
            for step in steps:
                if isinstance(step, str):
                    db.execute(step)
                else:
                    step(db)
            db.execute(f"PRAGMA user_version = {i}")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
