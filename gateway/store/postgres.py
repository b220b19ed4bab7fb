"""The networked store: PostgreSQL, for several gateways on one fleet.

Chosen by ``store.url`` (``postgresql://user:password@host:5432/db``); the
schema and its versions are in ``postgres_schema.py``, brought up to date at
start. It keeps every promise of the :class:`~gateway.store.base.Store`
protocol as the SQLite store does, one transaction for one of SQLite's.

Reservations, start unlocks, idempotent outcomes, the command audit, trips
and usage are here; events, the webhook outbox and alerts in
``postgres_events.py``; leases, the shared vehicle state and claimed
idempotency keys in ``postgres_shared.py``; the pool, its transaction and
error mapping all three share, in ``postgres_sql.py``.

The driver is psycopg 3 (with ``psycopg_pool``): maintained (by psycopg2's
authors, releases every few months), typed (it ships ``py.typed``, so
``mypy --strict`` checks our calls; asyncpg ships none and needs third-party
stubs), natively async, and built on libpq, so ``store.url`` takes every
libpq connection string and option (``sslmode``, ``target_session_attrs``,
``PG*`` variables) as ``psql`` does. It binds parameters on the server (the
extended protocol: values are never spliced into SQL) and prepares a
statement only after five executions on a connection, as protocol-level
named statements, which PgBouncer tracks from 1.21 on
(``max_prepared_statements``); an older pooler in transaction mode would
need ``prepare_threshold=None``, which no setting offers yet.
asyncpg speaks the protocol with its own implementation and prepares every
statement it runs (its statement cache), the documented cause of its
trouble behind PgBouncer in transaction mode (``statement_cache_size=0``).

Concurrency. SQLite's calls never yield: each runs whole before the next
starts, in one process. Here calls yield, and other gateways write the same
tables, so each read-modify-write is one transaction that first takes a
transaction-scoped advisory lock per car it reads the reservations of (the
reservation's car, the car it is on now, and a staff plan's candidate cars;
in one sorted order, so two plans do not deadlock). Under READ COMMITTED every
statement after the lock sees what every earlier holder committed, so the
overlap check and a staff plan see the car as it is and nobody else changes
it until they commit. ``cancel_reservation`` and ``start_trip`` take their
car's lock too: a plan never displaces a reservation cancelled, or whose trip
started, while it decided. The rest need no lock: each is decided by its first
statement, whose row locks and condition settle a race (``claim_start_unlock``'s
``su_status IS NULL``, ``end_trip``'s ``ended_ms IS NULL``, the open-alert
unique index, upserts).

A connection the server dropped (a restart, a failover) fails the call under
way with a StoreError and leaves the pool; the next call gets a new one.

The command audit is written behind, as SQLite's: rows gather for 50 ms and
go in one transaction, and a failed write keeps them in memory for the next
try. Written through, each unlock paid a round trip and its loop turns on
the request's path. Reads of the audit flush it first, so this instance
lists what it answered; another lists it within the 50 ms.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Iterable
from dataclasses import astuple

import orjson
import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from gateway.errors import StaleRead, StartupError, StoreError
from gateway.rules.commands import CommandRecord, Outcome
from gateway.rules.events import Event, ulid_floor
from gateway.rules.priority import PREEMPTED_BY_STAFF, Plan, Refusal, make_room
from gateway.rules.reservations import Reservation, StartUnlock, conflict
from gateway.rules.trips import Trip
from gateway.rules.usage import UsageRows, UsageUser, UsageVehicle
from gateway.store.base import (
    AUDIT_FLUSH_S,
    AUDIT_RETENTION_MS,
    AUDIT_RETRY_S,
    IDEMPOTENCY_RETENTION_MS,
    UNCHECKED,
    Room,
    Unchecked,
    audit_refused,
)
from gateway.store.postgres_events import EventTables
from gateway.store.postgres_schema import migrate
from gateway.store.postgres_shared import SharedTables
from gateway.store.postgres_sql import Conn, _listing, _one_line, redact
from gateway.store.rows import (
    COMMAND_COLUMNS,
    ENDED_AT,
    RESERVATION_COLUMNS,
    TRIP_COLUMNS,
    TRIP_FIELDS,
    to_command,
    to_reservation,
    to_trip,
)

__all__ = ["PostgresStore", "open_postgres", "redact"]


def _upsert(table: str, columns: str, key: str) -> str:
    """INSERT OR REPLACE, as SQLite says it: every column of a row already there takes the new value."""
    names = [c.strip() for c in columns.split(",")]
    sets = ", ".join(f"{n} = EXCLUDED.{n}" for n in names if n not in key.split(", "))
    marks = ", ".join(["%s"] * len(names))
    return f"INSERT INTO {table} ({columns}) VALUES ({marks}) ON CONFLICT ({key}) DO UPDATE SET {sets}"


_PUT_RESERVATION = _upsert("reservations", RESERVATION_COLUMNS, "id")
_PUT_COMMAND = _upsert("commands", COMMAND_COLUMNS, "command_id")
log = logging.getLogger(__name__)
_PUT_IDEMPOTENCY = _upsert("idempotency", "caller, key, fingerprint, outcome, created_ms", "caller, key")


def _reservation_row(r: Reservation) -> tuple[object, ...]:
    su = r.start_unlock
    return (
        r.id, r.vehicle_id, r.user_id, r.starts_ms, r.ends_ms, r.kind, r.unlock_at_start, r.cancelled,
        r.created_ms, r.updated_ms, su.status if su else None, su.at_ms if su else None,
        su.command_id if su else None, su.reason if su else None, r.created_by, r.completed, r.cancel_reason,
    )  # fmt: skip


def _car_lock(vehicle_id: str) -> int:
    """The advisory lock key of a car: the same in every process (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(b"gateway.car:" + vehicle_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


async def open_postgres(url: str, pool_size: int = 10, connect_timeout_s: float = 10.0) -> PostgresStore:
    """Connect, migrate and open a pool of `pool_size`; StartupError naming ``store.url`` (no password) if not."""
    where = redact(url)
    try:
        conn: Conn = await AsyncConnection.connect(url, autocommit=True, connect_timeout=max(1, int(connect_timeout_s)))
    except psycopg.Error as e:
        raise StartupError(f"store.url: cannot connect to {where}: {_one_line(e, url)}") from None
    try:
        await migrate(conn, where)
    except psycopg.Error as e:
        raise StartupError(f"store.url: cannot bring {where} up to date: {_one_line(e, url)}") from None
    finally:
        await conn.close()
    pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
        url, min_size=1, max_size=pool_size, kwargs={"autocommit": True}, open=False, timeout=connect_timeout_s,
        name="store",
    )  # fmt: skip
    try:
        await pool.open(wait=True, timeout=connect_timeout_s)
    except psycopg.Error as e:
        await pool.close()
        raise StartupError(f"store.url: cannot connect to {where}: {_one_line(e, url)}") from None
    return PostgresStore(pool, url)


class PostgresStore(EventTables, SharedTables):
    def __init__(self, pool: AsyncConnectionPool[Conn], url: str) -> None:
        super().__init__(pool, url)
        # The command audit is written behind, as SQLite's: one transaction per unlock on the request's
        # path cost a round trip and a loop turn each (measured: p99 several times SQLite's under load).
        self._audit: list[CommandRecord] = []
        self._audit_events: list[Event] = []
        self._flusher: asyncio.Task[None] | None = None
        self._flushing = asyncio.Lock()
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        try:
            await self._flush_audit()
        except StoreError as e:
            log.error("%s; %d audit records lost at shutdown", e, len(self._audit))
        await self.pool.close()

    # -- locking --

    @staticmethod
    async def _lock_cars(conn: Conn, reservation_id: str, cars: Iterable[str]) -> None:
        """Within a transaction: hold the cars given and the one `reservation_id` is on now, until commit.

        Whoever moves a reservation to another car holds the lock of the car it is on, so once that one
        is held, the reservation stays where it was read. A car found only then is locked out of order:
        if that deadlocks, PostgreSQL ends one of the two, and its caller gets a StoreError."""
        held: set[int] = set()
        want = set(cars)
        while True:
            cur = await conn.execute("SELECT vehicle_id FROM reservations WHERE id = %s", (reservation_id,))
            row = await cur.fetchone()
            if row is not None:
                want.add(row[0])
            keys = sorted({_car_lock(v) for v in want} - held)
            if not keys:
                return
            for key in keys:
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
            held.update(keys)

    # -- reservations --

    @staticmethod
    async def _check_unchanged(conn: Conn, reservation_id: str, expected: Reservation | Unchecked | None) -> None:
        # FOR UPDATE: a concurrent write to the row (a cancel, a start-unlock claim, a trip's end) commits
        # first and is what we compare with, or waits for our commit.
        if isinstance(expected, Unchecked):
            return
        cur = await conn.execute(
            f"SELECT {RESERVATION_COLUMNS} FROM reservations WHERE id = %s FOR UPDATE", (reservation_id,)
        )
        row = await cur.fetchone()
        if (None if row is None else to_reservation(row)) != expected:
            raise StaleRead(f"reservation {reservation_id} changed since it was read")

    async def get_reservation(self, reservation_id: str) -> Reservation | None:
        row = await self._one(
            "read a reservation", f"SELECT {RESERVATION_COLUMNS} FROM reservations WHERE id = %s", (reservation_id,)
        )
        return None if row is None else to_reservation(row)

    async def put_reservation(
        self, r: Reservation, now_ms: int, expected: Reservation | Unchecked | None = UNCHECKED
    ) -> Reservation | None:
        async with self._tx("store a reservation") as conn:
            await self._lock_cars(conn, r.id, [r.vehicle_id])
            await self._check_unchanged(conn, r.id, expected)
            clash = conflict(r, await self._live_of(conn, r.vehicle_id, now_ms), now_ms)
            if clash is not None:
                return clash
            await conn.execute(_PUT_RESERVATION, _reservation_row(r))
        return None

    async def put_with_priority(
        self, r: Reservation, now_ms: int, room: Room, expected: Reservation | Unchecked | None = UNCHECKED
    ) -> Plan | Refusal:
        async with self._tx("store a staff reservation") as conn:
            await self._lock_cars(conn, r.id, [r.vehicle_id, *room.candidates])
            await self._check_unchanged(conn, r.id, expected)
            in_the_way = [o for o in await self._live_of(conn, r.vehicle_id, now_ms) if o.id != r.id and o.overlaps(r)]
            # Without `r` itself: a staff reservation moving to another car frees the one it leaves.
            others: dict[str, list[Reservation]] = {}
            for vid in room.candidates:
                if vid != r.vehicle_id:
                    others[vid] = [o for o in await self._live_of(conn, vid, now_ms) if o.id != r.id]
            cur = await conn.execute(
                "SELECT reservation_id FROM trips WHERE reservation_id = ANY(%s)", ([o.id for o in in_the_way],)
            )
            started = {row[0] for row in await cur.fetchall()}
            decision = make_room(r, in_the_way, others, started, now_ms, room.notice_ms, room.early_grace_ms)
            if isinstance(decision, Refusal):
                return decision
            for m in decision.moves:
                if m.action == "reassigned":
                    await conn.execute(
                        "UPDATE reservations SET vehicle_id = %s, updated_ms = %s WHERE id = %s",
                        (m.vehicle_id, now_ms, m.reservation_id),
                    )
                else:
                    await conn.execute(
                        "UPDATE reservations SET cancelled = true, cancel_reason = %s, updated_ms = %s WHERE id = %s",
                        (PREEMPTED_BY_STAFF, now_ms, m.reservation_id),
                    )
            await conn.execute(_PUT_RESERVATION, _reservation_row(r))
            await self._insert_events(conn, room.events(decision))
        return decision

    @staticmethod
    async def _live_of(conn: Conn, vehicle_id: str, now_ms: int) -> list[Reservation]:
        cur = await conn.execute(
            f"SELECT {RESERVATION_COLUMNS} FROM reservations WHERE vehicle_id = %s AND ends_ms > %s AND NOT cancelled "
            "AND NOT completed ORDER BY starts_ms, id",
            (vehicle_id, now_ms),
        )
        return [to_reservation(row) for row in await cur.fetchall()]

    async def cancel_reservation(self, reservation_id: str, now_ms: int, reason: str = "cancelled") -> bool:
        async with self._tx("cancel a reservation") as conn:
            # Under its car's lock: a staff plan reading the car must not move a reservation cancelled meanwhile.
            await self._lock_cars(conn, reservation_id, ())
            cur = await conn.execute(
                "UPDATE reservations SET cancelled = true, cancel_reason = %s, updated_ms = %s "
                "WHERE id = %s AND NOT cancelled",
                (reason, now_ms, reservation_id),
            )
            return cur.rowcount == 1

    async def list_reservations(
        self, vehicle_id: str | None, from_ms: int | None, to_ms: int | None, limit: int
    ) -> list[Reservation]:
        sql, args = _listing(
            f"SELECT {RESERVATION_COLUMNS} FROM reservations",
            [("vehicle_id = %s", vehicle_id), ("ends_ms > %s", from_ms), ("starts_ms < %s", to_ms)],
            "starts_ms, id",
            limit,
        )
        return [to_reservation(r) for r in await self._rows("list reservations", sql, args)]

    # -- the start-time unlock --

    async def due_start_unlocks(self, now_ms: int) -> list[Reservation]:
        rows = await self._rows(
            "read due start unlocks",
            f"SELECT {RESERVATION_COLUMNS} FROM reservations WHERE unlock_at_start AND su_status IS NULL "
            "AND NOT cancelled AND starts_ms <= %s AND ends_ms > %s ORDER BY starts_ms",
            (now_ms, now_ms),
        )
        return [to_reservation(r) for r in rows]

    async def next_start_unlock_ms(self, now_ms: int) -> int | None:
        row = await self._one(
            "read the next start unlock",
            "SELECT min(starts_ms) FROM reservations "
            "WHERE unlock_at_start AND su_status IS NULL AND NOT cancelled AND ends_ms > %s",
            (now_ms,),
        )
        return None if row is None or row[0] is None else int(row[0])

    async def pending_start_unlocks(self) -> list[Reservation]:
        rows = await self._rows(
            "read pending start unlocks", f"SELECT {RESERVATION_COLUMNS} FROM reservations WHERE su_status = 'pending'"
        )
        return [to_reservation(r) for r in rows]

    async def claim_start_unlock(self, reservation_id: str, claim: StartUnlock) -> bool:
        return await self._set_start_unlock(reservation_id, claim, " AND su_status IS NULL")

    async def set_start_unlock(self, reservation_id: str, su: StartUnlock | None) -> None:
        await self._set_start_unlock(reservation_id, su, "")

    async def _set_start_unlock(self, reservation_id: str, su: StartUnlock | None, where: str) -> bool:
        values = (su.status, su.at_ms, su.command_id, su.reason) if su else (None, None, None, None)
        n = await self._count(
            "record a start unlock",
            "UPDATE reservations SET su_status = %s, su_at_ms = %s, su_command_id = %s, su_reason = %s WHERE id = %s"
            + where,
            (*values, reservation_id),
        )
        return n == 1

    # -- idempotency --

    async def save_idempotent_outcome(
        self, caller: str, key: str, fingerprint: str, outcome: Outcome, now_ms: int
    ) -> None:
        async with self._tx("save an idempotency key") as conn:
            await conn.execute(_PUT_IDEMPOTENCY, (caller, key, fingerprint, orjson.dumps(outcome.to_doc()), now_ms))
            # The outcome commits with the claim's end: whoever claims the key after this sees the outcome.
            await conn.execute("DELETE FROM idempotency_claims WHERE caller = %s AND key = %s", (caller, key))

    # -- the command audit --

    async def record_command(self, rec: CommandRecord, event: Event | None = None) -> None:
        # Rows gather for at most AUDIT_FLUSH_S and go in one transaction, the command's event with it (an
        # audited command always has its event). Reads of commands and events, and pruning, flush first.
        self._audit.append(rec)
        if event is not None:
            self._audit_events.append(event)
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_later(), name="store-audit-flush")

    async def _flush_later(self) -> None:
        try:
            while True:
                await asyncio.sleep(AUDIT_FLUSH_S)
                try:
                    await self._flush_audit()
                except StoreError as e:
                    audit_refused(e, self._audit, self._audit_events)
                    await asyncio.sleep(AUDIT_RETRY_S)
                    continue
                # Records that came while this flush waited on the database saw a flusher running and
                # started none: this one writes them too before it ends.
                if not self._audit and not self._audit_events:
                    return
        finally:
            self._flusher = None

    async def _flush_audit(self) -> None:
        async with self._flushing:
            if not self._audit and not self._audit_events:
                return
            records, self._audit = self._audit, []
            events, self._audit_events = self._audit_events, []
            try:
                async with self._tx("record commands") as conn:
                    async with conn.cursor() as cur:
                        await cur.executemany(_PUT_COMMAND, [astuple(r) for r in records])
                    if events:
                        await self._insert_events(conn, events)
            except BaseException:
                self._audit[:0], self._audit_events[:0] = records, events  # kept, in order, for the next try
                if self._flusher is None and not self._closed:  # a reader's flush failed: retry behind it
                    self._flusher = asyncio.create_task(self._flush_later(), name="store-audit-flush")
                raise

    async def list_commands(
        self, vehicle_id: str, from_ms: int | None, to_ms: int | None, limit: int
    ) -> list[CommandRecord]:
        await self._flush_audit()
        sql, args = _listing(
            f"SELECT {COMMAND_COLUMNS} FROM commands",
            [("vehicle_id = %s", vehicle_id), ("issued_ms >= %s", from_ms), ("issued_ms < %s", to_ms)],
            "issued_ms DESC, command_id DESC",
            limit,
        )
        return [to_command(r) for r in await self._rows("list commands", sql, args)]

    # -- trips --

    async def start_trip(self, t: Trip, event: Event | None = None) -> bool:
        # Every `done` unlock of a reservation comes here and all but the first find its trip: a read,
        # not a write transaction, for those.
        if await self._one("start a trip", "SELECT 1 FROM trips WHERE reservation_id = %s", (t.reservation_id,)):
            return False
        async with self._tx("start a trip") as conn:
            # Under its car's lock: a staff plan must not displace a reservation whose trip starts meanwhile.
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_car_lock(t.vehicle_id),))
            cur = await conn.execute(
                f"INSERT INTO trips ({TRIP_COLUMNS}) VALUES ({', '.join(['%s'] * len(TRIP_FIELDS))}) "
                "ON CONFLICT (reservation_id) DO NOTHING",
                astuple(t),
            )
            if cur.rowcount != 1:
                return False
            if event is not None:
                await self._insert_events(conn, [event])
        return True

    async def get_trip(self, reservation_id: str) -> Trip | None:
        row = await self._one(
            "read a trip", f"SELECT {TRIP_COLUMNS} FROM trips WHERE reservation_id = %s", (reservation_id,)
        )
        return None if row is None else to_trip(row)

    async def running_trips(self, booked_end_before_ms: int) -> list[Trip]:
        rows = await self._rows(
            "read running trips",
            f"SELECT {TRIP_COLUMNS} FROM trips WHERE ended_ms IS NULL AND booked_end_ms < %s ORDER BY booked_end_ms",
            (booked_end_before_ms,),
        )
        return [to_trip(r) for r in rows]

    async def end_trip(self, t: Trip, month: str, event: Event | None = None) -> bool:
        # What ending sets: ended_ms and every field after it, and the month the statement counts it in.
        names = [*TRIP_FIELDS[ENDED_AT:], "month"]
        values = (*astuple(t)[ENDED_AT:], month)
        async with self._tx("end a trip") as conn:
            cur = await conn.execute(
                f"UPDATE trips SET {', '.join(f'{n} = %s' for n in names)} "
                "WHERE reservation_id = %s AND ended_ms IS NULL",
                (*values, t.reservation_id),
            )
            if cur.rowcount != 1:
                return False
            # Summed from the row just stored, so the sums can only ever agree with the trips.
            await conn.execute(
                "INSERT INTO usage_cars AS u SELECT month, vehicle_id, station, kind, 1, coalesce(duration_min, 0), "
                "coalesce(distance_km, 0), coalesce(energy_kwh, 0), coalesce(amount_cents, 0) FROM trips "
                "WHERE reservation_id = %s ON CONFLICT (month, vehicle_id, station, kind) DO UPDATE SET "
                "trips = u.trips + 1, duration_min = u.duration_min + EXCLUDED.duration_min, "
                "distance_km = u.distance_km + EXCLUDED.distance_km, energy_kwh = u.energy_kwh + EXCLUDED.energy_kwh, "
                "amount_cents = u.amount_cents + EXCLUDED.amount_cents",
                (t.reservation_id,),
            )
            await conn.execute(
                "UPDATE reservations SET completed = true, updated_ms = %s WHERE id = %s",
                (t.ended_ms, t.reservation_id),
            )
            if event is not None:
                await self._insert_events(conn, [event])
        return True

    async def list_trips(
        self, from_ms: int | None, to_ms: int | None, vehicle_id: str | None, user_id: str | None, limit: int
    ) -> list[Trip]:
        sql, args = _listing(
            f"SELECT {TRIP_COLUMNS} FROM trips",
            [("started_ms >= %s", from_ms), ("started_ms < %s", to_ms), ("vehicle_id = %s", vehicle_id),
             ("user_id = %s", user_id)],
            "started_ms, reservation_id",
            limit,
        )  # fmt: skip
        return [to_trip(r) for r in await self._rows("list trips", sql, args)]

    async def usage(self, month: str) -> UsageRows:
        async with self._conn("read the usage of a month") as conn:
            # The station of the user's first public trip of the month: where the month's fee is counted.
            cur = await conn.execute(
                "SELECT user_id, count(*), sum(billed_min), sum(coalesce(distance_km, 0)), sum(amount_cents), "
                "count(*) FILTER (WHERE kind = 'public'), "
                "(array_agg(station ORDER BY started_ms, reservation_id) FILTER (WHERE kind = 'public'))[1] "
                "FROM trips WHERE month = %s GROUP BY user_id ORDER BY user_id",
                (month,),
            )
            users = await cur.fetchall()
            cur = await conn.execute(
                "SELECT vehicle_id, station, kind, trips, duration_min, distance_km, energy_kwh, amount_cents "
                "FROM usage_cars WHERE month = %s ORDER BY vehicle_id, station, kind",
                (month,),
            )
            cars = await cur.fetchall()
        return UsageRows(
            users=[UsageUser(u, int(n), int(b), float(d), int(a), int(p), st) for u, n, b, d, a, p, st in users],
            vehicles=[UsageVehicle(v, s, k, int(n), dm, dk, e, int(a)) for v, s, k, n, dm, dk, e, a in cars],
        )

    # -- housekeeping --

    async def prune(self, now_ms: int, events_before_ms: int | None = None) -> int:
        await self._flush_audit()
        async with self._tx("prune old rows") as conn:
            a = await conn.execute(
                "DELETE FROM idempotency WHERE created_ms < %s", (now_ms - IDEMPOTENCY_RETENTION_MS,)
            )
            b = await conn.execute("DELETE FROM commands WHERE issued_ms < %s", (now_ms - AUDIT_RETENTION_MS,))
            # An expired claim is free already: only its row is left.
            c = await conn.execute("DELETE FROM idempotency_claims WHERE expires_ms <= %s", (now_ms,))
            n = a.rowcount + b.rowcount + c.rowcount
            if events_before_ms is not None:
                # Ids are ULIDs, ordered by time: every event before a time has an id below that time's.
                first_kept = "evt_" + ulid_floor(events_before_ms)
                await conn.execute("DELETE FROM deliveries WHERE event_id < %s", (first_kept,))
                c = await conn.execute("DELETE FROM events WHERE id < %s", (first_kept,))
                n += c.rowcount
        return n
