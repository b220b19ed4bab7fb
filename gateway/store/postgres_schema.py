"""The PostgreSQL store's schema, versioned in a ``schema_version`` table.

:data:`MIGRATIONS` is the list of versions, oldest first, as in
``sqlite_schema.py``; :func:`migrate` brings a database of any older version
up to date at start-up, each version in a transaction of its own (DDL is
transactional here: a version is all there or not at all). A version, once
released, is never edited: a change is a new version.

Version 1 is the SQLite schema of version 5 as a whole: no PostgreSQL
database predates it; version 2 is SQLite's version 6. Where the two differ, it is on purpose:

* text keys are ``COLLATE "C"``: listings, ``id > after`` and pruning by
  ULID compare bytes, as SQLite does, whatever the database's locale;
* ``REAL`` is ``double precision`` (SQLite's REAL is 8 bytes; ``real`` here
  is 4, and 5.2 km would come back as 5.19999980926);
* flags are ``boolean``, times in ms ``bigint``, bodies ``bytea`` (opaque to
  the store, returned byte for byte: an event's body is what was signed).
"""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection

from gateway.errors import StartupError

__all__ = ["MIGRATIONS", "MIGRATION_LOCK", "current_version", "migrate"]

# Held (transaction-scoped) while migrating: two gateways starting at once on a new database would
# otherwise both create the tables, and one of them fail.
MIGRATION_LOCK = 0x6761_7465_7761_7931  # "gatewy1"

_T = 'text COLLATE "C"'

MIGRATIONS: list[tuple[str, list[str]]] = [
    (
        "reservations, idempotent outcomes, the command audit, trips and usage, events, deliveries, alerts",
        [
            f"""CREATE TABLE reservations (
                id {_T} PRIMARY KEY,
                vehicle_id {_T} NOT NULL,
                user_id {_T} NOT NULL,
                starts_ms bigint NOT NULL,
                ends_ms bigint NOT NULL,
                kind {_T} NOT NULL,
                unlock_at_start boolean NOT NULL,
                cancelled boolean NOT NULL DEFAULT false,
                created_ms bigint NOT NULL,
                updated_ms bigint NOT NULL,
                su_status {_T},
                su_at_ms bigint,
                su_command_id {_T},
                su_reason {_T},
                created_by {_T},
                completed boolean NOT NULL DEFAULT false,
                cancel_reason {_T}
            )""",
            # The overlap check reads a car's live reservations: those not ended, cancelled or completed.
            "CREATE INDEX reservations_vehicle ON reservations (vehicle_id, ends_ms) "
            "WHERE NOT cancelled AND NOT completed",
            "CREATE INDEX reservations_due ON reservations (starts_ms) WHERE unlock_at_start AND su_status IS NULL",
            "CREATE INDEX reservations_pending ON reservations (su_status) WHERE su_status = 'pending'",
            "CREATE INDEX reservations_starts ON reservations (starts_ms, id)",
            f"""CREATE TABLE idempotency (
                caller {_T} NOT NULL,
                key {_T} NOT NULL,
                fingerprint {_T} NOT NULL,
                outcome bytea NOT NULL,
                created_ms bigint NOT NULL,
                PRIMARY KEY (caller, key)
            )""",
            "CREATE INDEX idempotency_created ON idempotency (created_ms)",
            f"""CREATE TABLE commands (
                command_id {_T} PRIMARY KEY,
                vehicle_id {_T} NOT NULL,
                action {_T} NOT NULL,
                reservation_id {_T},
                caller {_T} NOT NULL,
                source {_T} NOT NULL,
                issued_ms bigint NOT NULL,
                result {_T} NOT NULL,
                reason {_T},
                latency_ms double precision
            )""",
            "CREATE INDEX commands_vehicle ON commands (vehicle_id, issued_ms)",
            "CREATE INDEX commands_issued ON commands (issued_ms)",
            f"""CREATE TABLE trips (
                reservation_id {_T} PRIMARY KEY,
                vehicle_id {_T} NOT NULL,
                user_id {_T} NOT NULL,
                kind {_T} NOT NULL,
                station {_T} NOT NULL,
                booked_start_ms bigint NOT NULL,
                booked_end_ms bigint NOT NULL,
                started_ms bigint NOT NULL,
                start_odometer_km double precision,
                start_soc_pct double precision,
                ended_ms bigint,
                ended_by {_T},
                forced boolean NOT NULL DEFAULT false,
                end_odometer_km double precision,
                end_soc_pct double precision,
                end_at_station boolean,
                distance_km double precision,
                energy_kwh double precision,
                duration_min double precision,
                late_min double precision,
                billed_min bigint,
                amount_cents bigint,
                month {_T}
            )""",
            "CREATE INDEX trips_started ON trips (started_ms)",
            "CREATE INDEX trips_vehicle ON trips (vehicle_id, started_ms)",
            "CREATE INDEX trips_user ON trips (user_id, started_ms)",
            "CREATE INDEX trips_running ON trips (booked_end_ms) WHERE ended_ms IS NULL",
            "CREATE INDEX trips_month_user ON trips (month, user_id)",
            f"""CREATE TABLE usage_cars (
                month {_T} NOT NULL,
                vehicle_id {_T} NOT NULL,
                station {_T} NOT NULL,
                kind {_T} NOT NULL,
                trips bigint NOT NULL,
                duration_min double precision NOT NULL,
                distance_km double precision NOT NULL,
                energy_kwh double precision NOT NULL,
                amount_cents bigint NOT NULL,
                PRIMARY KEY (month, vehicle_id, station, kind)
            )""",
            # id is a ULID: ordered as recorded, so listing after an id and pruning by age are ranges on the key.
            f"""CREATE TABLE events (
                id {_T} PRIMARY KEY,
                type {_T} NOT NULL,
                ts_ms bigint NOT NULL,
                body bytea NOT NULL
            )""",
            "CREATE INDEX events_type ON events (type, id)",
            f"""CREATE TABLE deliveries (
                event_id {_T} NOT NULL,
                endpoint {_T} NOT NULL,
                state {_T} NOT NULL DEFAULT 'pending',
                attempts integer NOT NULL DEFAULT 0,
                due_ms bigint NOT NULL,
                last_error {_T},
                done_ms bigint,
                PRIMARY KEY (event_id, endpoint)
            )""",
            "CREATE INDEX deliveries_due ON deliveries (endpoint, due_ms) WHERE state = 'pending'",
            # reservation_id '' for an alert about the car alone, so that the unique index below holds.
            f"""CREATE TABLE alerts (
                id {_T} PRIMARY KEY,
                type {_T} NOT NULL,
                vehicle_id {_T} NOT NULL,
                reservation_id {_T} NOT NULL DEFAULT '',
                opened_ms bigint NOT NULL,
                resolved_ms bigint,
                message {_T} NOT NULL,
                details bytea NOT NULL
            )""",
            # At most one open alert per type, car and reservation, whatever the callers (and instances) do.
            "CREATE UNIQUE INDEX alerts_open ON alerts (type, vehicle_id, reservation_id) WHERE resolved_ms IS NULL",
            "CREATE INDEX alerts_vehicle ON alerts (vehicle_id, opened_ms)",
            "CREATE INDEX alerts_opened ON alerts (opened_ms)",
        ],
    ),
    (
        "leases, the shared latest state of the cars, claimed idempotency keys",
        [
            # One row per piece of work done once across instances; free once expires_ms has passed.
            f"CREATE TABLE leases (name {_T} PRIMARY KEY, holder {_T} NOT NULL, expires_ms bigint NOT NULL)",
            # The change number of the shared state. Its values are taken under one advisory lock, so they
            # commit in order (postgres_shared.py, put_states).
            "CREATE SEQUENCE state_seq",
            f"""CREATE TABLE vehicle_readings (
                vehicle_id {_T} NOT NULL,
                kind {_T} NOT NULL,
                ts_ms bigint NOT NULL,
                fields jsonb NOT NULL,
                seq bigint NOT NULL,
                PRIMARY KEY (vehicle_id, kind)
            )""",
            "CREATE INDEX vehicle_readings_seq ON vehicle_readings (seq)",
            f"CREATE TABLE vehicles_seen (vehicle_id {_T} PRIMARY KEY, last_seen_ms bigint NOT NULL, "
            "seq bigint NOT NULL)",
            "CREATE INDEX vehicles_seen_seq ON vehicles_seen (seq)",
            f"""CREATE TABLE idempotency_claims (
                caller {_T} NOT NULL,
                key {_T} NOT NULL,
                fingerprint {_T} NOT NULL,
                holder {_T} NOT NULL,
                expires_ms bigint NOT NULL,
                PRIMARY KEY (caller, key)
            )""",
        ],
    ),
]

_VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_version (version integer PRIMARY KEY, description text NOT NULL, "
    "applied_at timestamptz NOT NULL DEFAULT now())"
)


async def current_version(conn: AsyncConnection[Any]) -> int:
    """The newest version applied; 0 for a database without the table."""
    cur = await conn.execute("SELECT to_regclass('schema_version') IS NOT NULL")
    row = await cur.fetchone()
    if row is None or not row[0]:
        return 0
    cur = await conn.execute("SELECT coalesce(max(version), 0) FROM schema_version")
    row = await cur.fetchone()
    return 0 if row is None else int(row[0])


async def migrate(conn: AsyncConnection[Any], where: str) -> None:
    """Bring the database `conn` is on (`where`, for messages) up to date; StartupError if it is newer."""
    while True:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            version = await current_version(conn)
            if version == 0:
                await conn.execute(_VERSION_TABLE)
            if version > len(MIGRATIONS):
                raise StartupError(
                    f"store.url: {where} is at schema version {version}, newer than this gateway knows "
                    f"({len(MIGRATIONS)})"
                )
            if version == len(MIGRATIONS):
                return
            description, steps = MIGRATIONS[version]
            for step in steps:
                await conn.execute(step)
            await conn.execute(
                "INSERT INTO schema_version (version, description) VALUES (%s, %s)", (version + 1, description)
            )
