"""The networked store: PostgreSQL, for several gateways on one fleet.

Chosen by ``store.url`` (``postgresql://user:password@host:5432/db``); the
schema and its versions are in ``postgres_schema.py``, brought up to date at
start. It keeps every promise of the :class:`~gateway.store.base.Store`
protocol as the SQLite store does, one transaction for one of SQLite's.

The driver is psycopg 3 (with ``psycopg_pool``): maintained (by psycopg2's
authors, releases every few months), typed (it ships ``py.typed``, so
``mypy --strict`` checks our calls; asyncpg ships none and needs third-party
stubs), natively async, and built on libpq, so ``store.url`` takes every
libpq connection string and option (``sslmode``, ``target_session_attrs``,
``PG*`` variables) as ``psql`` does. It binds parameters on the server (the
extended protocol: values are never spliced into SQL) and prepares a
statement only after five executions on a connection, which
``prepare_threshold=None`` turns off for a pooler that cannot track them.
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

The command audit is written through, not behind as SQLite's: a round trip
does not stall the event loop, and every instance then sees every record.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Collection, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import astuple, fields
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from gateway.errors import StaleRead, StartupError, StoreError
from gateway.rules.alerts import Alert
from gateway.rules.commands import CommandRecord, Outcome
from gateway.rules.events import Event, ulid_floor
from gateway.rules.priority import PREEMPTED_BY_STAFF, Plan, Refusal, make_room
from gateway.rules.reservations import Reservation, StartUnlock, conflict
from gateway.rules.trips import Trip
from gateway.rules.usage import UsageRows, UsageUser, UsageVehicle
from gateway.rules.webhooks import Attempt, Delivery
from gateway.store.base import (
    AUDIT_RETENTION_MS,
    IDEMPOTENCY_CLAIM_TTL_MS,
    IDEMPOTENCY_RETENTION_MS,
    UNCHECKED,
    AlertStatus,
    Claim,
    DeliveryEnd,
    Room,
    StoredReading,
    Unchecked,
    newest_of,
)
from gateway.store.postgres_schema import migrate
from gateway.store.rows import to_alert, to_command, to_reservation

__all__ = ["PostgresStore", "open_postgres", "redact"]

Conn = AsyncConnection[tuple[Any, ...]]

_COLUMNS = (
    "id, vehicle_id, user_id, starts_ms, ends_ms, kind, unlock_at_start, cancelled, created_ms, updated_ms, "
    "su_status, su_at_ms, su_command_id, su_reason, created_by, completed, cancel_reason"
)
_TRIP_FIELDS = [f.name for f in fields(Trip)]
_TRIP_COLUMNS = ", ".join(_TRIP_FIELDS)
_ENDED_AT = _TRIP_FIELDS.index("ended_ms")
_COMMAND_COLUMNS = (
    "command_id, vehicle_id, action, reservation_id, caller, source, issued_ms, result, reason, latency_ms"
)
_ALERT_COLUMNS = "id, type, vehicle_id, reservation_id, opened_ms, message, details, resolved_ms"


def _upsert(table: str, columns: str, key: str) -> str:
    """INSERT OR REPLACE, as SQLite says it: every column of a row already there takes the new value."""
    names = [c.strip() for c in columns.split(",")]
    sets = ", ".join(f"{n} = EXCLUDED.{n}" for n in names if n not in key.split(", "))
    marks = ", ".join(["%s"] * len(names))
    return f"INSERT INTO {table} ({columns}) VALUES ({marks}) ON CONFLICT ({key}) DO UPDATE SET {sets}"


_PUT_RESERVATION = _upsert("reservations", _COLUMNS, "id")
_PUT_COMMAND = _upsert("commands", _COMMAND_COLUMNS, "command_id")
AUDIT_FLUSH_S = 0.05  # as SQLite's
AUDIT_MAX_PENDING = 100_000
log = logging.getLogger(__name__)
_PUT_IDEMPOTENCY = _upsert("idempotency", "caller, key, fingerprint, outcome, created_ms", "caller, key")

# Held (transaction-scoped) by every write of the shared vehicle state, around taking its change number
# and until commit: see put_states.
STATE_LOCK = 0x6761_7465_7374_6174  # "gatestat"

# Inserted, or updated only if ours or expired: one statement, so PostgreSQL settles a race on the row
# (a second inserter waits for the first's commit, then takes the update path and checks its WHERE
# against the row as committed).
_TAKE_LEASE = (
    "INSERT INTO leases AS l (name, holder, expires_ms) VALUES (%s, %s, %s) ON CONFLICT (name) DO UPDATE "
    "SET holder = EXCLUDED.holder, expires_ms = EXCLUDED.expires_ms "
    "WHERE l.holder = EXCLUDED.holder OR l.expires_ms <= %s RETURNING holder"
)
_CLAIM_KEY = (
    "INSERT INTO idempotency_claims AS c (caller, key, fingerprint, holder, expires_ms) VALUES (%s, %s, %s, %s, %s) "
    "ON CONFLICT (caller, key) DO UPDATE SET fingerprint = EXCLUDED.fingerprint, holder = EXCLUDED.holder, "
    "expires_ms = EXCLUDED.expires_ms WHERE c.holder = EXCLUDED.holder OR c.expires_ms <= %s RETURNING holder"
)


def _reservation_row(r: Reservation) -> tuple[object, ...]:
    su = r.start_unlock
    return (
        r.id, r.vehicle_id, r.user_id, r.starts_ms, r.ends_ms, r.kind, r.unlock_at_start, r.cancelled,
        r.created_ms, r.updated_ms, su.status if su else None, su.at_ms if su else None,
        su.command_id if su else None, su.reason if su else None, r.created_by, r.completed, r.cancel_reason,
    )  # fmt: skip


def _trip(r: Sequence[Any]) -> Trip:
    return Trip(*r)


def _car_lock(vehicle_id: str) -> int:
    """The advisory lock key of a car: the same in every process (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(b"gateway.car:" + vehicle_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _listing(select: str, filters: list[tuple[str, object | None]], order: str, limit: int) -> tuple[str, list[object]]:
    """`select` with the conditions whose value is given, in `order`, at most `limit` rows.

    A condition without a ``%s`` takes no argument: its value only says whether it applies."""
    used = [(cond, value) for cond, value in filters if value is not None]
    where = " WHERE " + " AND ".join(cond for cond, _ in used) if used else ""
    args = [value for cond, value in used if "%s" in cond]
    return f"{select}{where} ORDER BY {order} LIMIT %s", [*args, limit]


def redact(url: str) -> str:
    """`url` without its password, to name it in a message or a log."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
    except ValueError:
        return "(an unparsable URL)"


def _one_line(e: BaseException, url: str) -> str:
    """libpq's message on one line, the password not in it (a malformed URL may be quoted back whole)."""
    text = "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
    text = text.replace(url, redact(url))
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    return text.replace(password, "***") if password else text


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


class PostgresStore:
    def __init__(self, pool: AsyncConnectionPool[Conn], url: str) -> None:
        self.pool = pool
        self._url = url  # only to keep its password out of error messages
        # The command audit is written behind, as SQLite's: one transaction per unlock on the request's
        # path cost a round trip and a loop turn each (measured: p99 several times SQLite's under load).
        self._audit: list[CommandRecord] = []
        self._audit_events: list[Event] = []
        self._flusher: asyncio.Task[None] | None = None
        self._flushing = asyncio.Lock()

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        try:
            await self._flush_audit()
        except StoreError as e:
            log.error("%s; %d audit records lost at shutdown", e, len(self._audit))
        await self.pool.close()

    @asynccontextmanager
    async def _conn(self, what: str) -> AsyncIterator[Conn]:
        """A connection of the pool in autocommit: each statement its own transaction."""
        try:
            async with self.pool.connection() as conn:
                yield conn
        except psycopg.Error as e:
            raise StoreError(f"the store could not {what}: {_one_line(e, self._url)}") from e

    @asynccontextmanager
    async def _tx(self, what: str) -> AsyncIterator[Conn]:
        """One transaction: committed if the block ends, rolled back if it raises (anything)."""
        async with self._conn(what) as conn, conn.transaction():
            yield conn

    async def _rows(self, what: str, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        async with self._conn(what) as conn:
            cur = await conn.execute(sql, args)
            return await cur.fetchall()

    async def _one(self, what: str, sql: str, args: Sequence[object] = ()) -> tuple[Any, ...] | None:
        async with self._conn(what) as conn:
            cur = await conn.execute(sql, args)
            return await cur.fetchone()

    async def _count(self, what: str, sql: str, args: Sequence[object] = ()) -> int:
        async with self._conn(what) as conn:
            cur = await conn.execute(sql, args)
            return cur.rowcount

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
        cur = await conn.execute(f"SELECT {_COLUMNS} FROM reservations WHERE id = %s FOR UPDATE", (reservation_id,))
        row = await cur.fetchone()
        if (None if row is None else to_reservation(row)) != expected:
            raise StaleRead(f"reservation {reservation_id} changed since it was read")

    async def get_reservation(self, reservation_id: str) -> Reservation | None:
        row = await self._one(
            "read a reservation", f"SELECT {_COLUMNS} FROM reservations WHERE id = %s", (reservation_id,)
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
            f"SELECT {_COLUMNS} FROM reservations WHERE vehicle_id = %s AND ends_ms > %s AND NOT cancelled "
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
            f"SELECT {_COLUMNS} FROM reservations",
            [("vehicle_id = %s", vehicle_id), ("ends_ms > %s", from_ms), ("starts_ms < %s", to_ms)],
            "starts_ms, id",
            limit,
        )
        return [to_reservation(r) for r in await self._rows("list reservations", sql, args)]

    # -- the start-time unlock --

    async def due_start_unlocks(self, now_ms: int) -> list[Reservation]:
        rows = await self._rows(
            "read due start unlocks",
            f"SELECT {_COLUMNS} FROM reservations WHERE unlock_at_start AND su_status IS NULL "
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
            "read pending start unlocks", f"SELECT {_COLUMNS} FROM reservations WHERE su_status = 'pending'"
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

    async def idempotent_outcome(self, caller: str, key: str) -> tuple[str, Outcome] | None:
        row = await self._one(
            "read an idempotency key",
            "SELECT fingerprint, outcome FROM idempotency WHERE caller = %s AND key = %s",
            (caller, key),
        )
        return None if row is None else (str(row[0]), Outcome.from_doc(orjson.loads(row[1])))

    async def save_idempotent_outcome(
        self, caller: str, key: str, fingerprint: str, outcome: Outcome, now_ms: int
    ) -> None:
        async with self._tx("save an idempotency key") as conn:
            await conn.execute(_PUT_IDEMPOTENCY, (caller, key, fingerprint, orjson.dumps(outcome.to_doc()), now_ms))
            # The outcome commits with the claim's end: whoever claims the key after this sees the outcome.
            await conn.execute("DELETE FROM idempotency_claims WHERE caller = %s AND key = %s", (caller, key))

    async def claim_idempotency_key(
        self, caller: str, key: str, fingerprint: str, holder: str, now_ms: int,
        ttl_ms: int = IDEMPOTENCY_CLAIM_TTL_MS,
    ) -> Claim:  # fmt: skip
        # Claim first, then read the outcome. The claim statement settles who holds the key (as take_lease).
        # The read is a later statement, so under READ COMMITTED it sees every commit before it began; a
        # claim that succeeded because the last holder saved its outcome (which ends the claim in the same
        # transaction) therefore finds that outcome. Read first and claim second, an outcome saved between
        # the two would be missed and the request run twice.
        async with self._tx("claim an idempotency key") as conn:
            cur = await conn.execute(_CLAIM_KEY, (caller, key, fingerprint, holder, now_ms + ttl_ms, now_ms))
            claimed = await cur.fetchone() is not None
            cur = await conn.execute(
                "SELECT fingerprint, outcome FROM idempotency WHERE caller = %s AND key = %s", (caller, key)
            )
            saved = await cur.fetchone()
            if saved is not None:
                if claimed:  # nothing to run: not left to block anyone until it expires
                    await conn.execute(
                        "DELETE FROM idempotency_claims WHERE caller = %s AND key = %s AND holder = %s",
                        (caller, key, holder),
                    )
                return str(saved[0]), Outcome.from_doc(orjson.loads(saved[1]))
        return "claimed" if claimed else "pending"

    async def release_idempotency_key(self, caller: str, key: str, holder: str) -> None:
        await self._count(
            "release an idempotency key",
            "DELETE FROM idempotency_claims WHERE caller = %s AND key = %s AND holder = %s",
            (caller, key, holder),
        )

    # -- leases --

    async def take_lease(self, name: str, holder: str, now_ms: int, ttl_ms: int) -> bool:
        row = await self._one("take a lease", _TAKE_LEASE, (name, holder, now_ms + ttl_ms, now_ms))
        return row is not None

    async def release_lease(self, name: str, holder: str) -> None:
        await self._count("release a lease", "DELETE FROM leases WHERE name = %s AND holder = %s", (name, holder))

    # -- the shared latest state --

    async def put_states(self, readings: Sequence[StoredReading], seen: Mapping[str, int]) -> int:
        rows, last_seen = newest_of(readings, seen)
        if not rows and not last_seen:
            return 0
        # Change numbers must become visible in order, or a reader that has seen 12 would ask for "after 12"
        # and never see 11 committed late. So writers take turns: the lock is held from before nextval
        # until commit, and a transaction is visible before its locks go, so the next writer's number is
        # both larger and committed later. A reader's one statement thus sees a prefix of the numbers, and
        # "seq > cursor" misses nothing. The cost is one writer at a time, a few ms for a batch of hundreds.
        #
        # One statement, so one round trip (it is its own transaction, in autocommit): the lock is taken
        # before nextval (`s` reads from `l`), both inserts use that number. An ON CONFLICT update compares
        # with the row as last committed, not as of the statement's start, so the newest still wins. Each
        # list goes as one JSON document the server unpacks: psycopg's array dumper escapes every element
        # in Python (measured: 33 ms of the event loop for 1,500 readings, against about 2).
        async with self._conn("store the vehicle state") as conn:
            cur = await conn.execute(
                "WITH l AS (SELECT pg_advisory_xact_lock(%s)), s AS (SELECT nextval('state_seq') AS seq FROM l), "
                "r AS (INSERT INTO vehicle_readings AS r (vehicle_id, kind, ts_ms, fields, seq) "
                "SELECT x->>0, x->>1, (x->>2)::bigint, x->3, s.seq FROM s, jsonb_array_elements(%s::jsonb) AS x "
                "ON CONFLICT (vehicle_id, kind) DO UPDATE SET ts_ms = EXCLUDED.ts_ms, fields = EXCLUDED.fields, "
                "seq = EXCLUDED.seq WHERE r.ts_ms <= EXCLUDED.ts_ms), "
                "v AS (INSERT INTO vehicles_seen AS v (vehicle_id, last_seen_ms, seq) "
                "SELECT key, value::bigint, s.seq FROM s, jsonb_each_text(%s::jsonb) "
                "ON CONFLICT (vehicle_id) DO UPDATE SET last_seen_ms = EXCLUDED.last_seen_ms, seq = EXCLUDED.seq "
                "WHERE v.last_seen_ms < EXCLUDED.last_seen_ms) "
                "SELECT seq FROM s",
                (STATE_LOCK, orjson.dumps([(r.vehicle_id, r.kind, r.ts_ms, r.fields) for r in rows]).decode(),
                 orjson.dumps(last_seen).decode()),
            )  # fmt: skip
            row = await cur.fetchone()
        assert row is not None
        return int(row[0])

    async def states_changed_since(self, cursor: int, own: int = 0) -> tuple[list[StoredReading], dict[str, int], int]:
        # One statement, so one snapshot: the readings and the times as of the same commit. Moving the
        # cursor past `own` skips nothing: its writer held STATE_LOCK until commit, so every smaller number
        # was committed before it.
        rows = await self._rows(
            "read the vehicle state",
            "SELECT vehicle_id, kind, ts_ms, fields::text, seq FROM vehicle_readings WHERE seq > %s AND seq <> %s "
            "UNION ALL SELECT vehicle_id, NULL, last_seen_ms, NULL, seq FROM vehicles_seen "
            "WHERE seq > %s AND seq <> %s",
            (cursor, own, cursor, own),
        )
        # As text, parsed by orjson: several times faster than psycopg's jsonb loader (the stdlib's json).
        readings = [StoredReading(v, k, t, orjson.loads(f)) for v, k, t, f, _ in rows if k is not None]
        seen = {v: t for v, k, t, _, _ in rows if k is None}
        return readings, seen, max(cursor, own, *(r[4] for r in rows))

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
            await asyncio.sleep(AUDIT_FLUSH_S)
            while True:
                try:
                    await self._flush_audit()
                    return
                except StoreError as e:
                    log.error("%s; %d audit records kept in memory, retrying", e, len(self._audit))
                    if len(self._audit) > AUDIT_MAX_PENDING:
                        dropped = len(self._audit) - AUDIT_MAX_PENDING
                        del self._audit[:dropped]
                        del self._audit_events[: max(0, len(self._audit_events) - AUDIT_MAX_PENDING)]
                        log.error("the store has refused the audit for too long: %d oldest records dropped", dropped)
                    await asyncio.sleep(1.0)
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
                raise

    async def list_commands(
        self, vehicle_id: str, from_ms: int | None, to_ms: int | None, limit: int
    ) -> list[CommandRecord]:
        await self._flush_audit()
        sql, args = _listing(
            f"SELECT {_COMMAND_COLUMNS} FROM commands",
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
                f"INSERT INTO trips ({_TRIP_COLUMNS}) VALUES ({', '.join(['%s'] * len(_TRIP_FIELDS))}) "
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
            "read a trip", f"SELECT {_TRIP_COLUMNS} FROM trips WHERE reservation_id = %s", (reservation_id,)
        )
        return None if row is None else _trip(row)

    async def running_trips(self, booked_end_before_ms: int) -> list[Trip]:
        rows = await self._rows(
            "read running trips",
            f"SELECT {_TRIP_COLUMNS} FROM trips WHERE ended_ms IS NULL AND booked_end_ms < %s ORDER BY booked_end_ms",
            (booked_end_before_ms,),
        )
        return [_trip(r) for r in rows]

    async def end_trip(self, t: Trip, month: str, event: Event | None = None) -> bool:
        # What ending sets: ended_ms and every field after it, and the month the statement counts it in.
        names = [*_TRIP_FIELDS[_ENDED_AT:], "month"]
        values = (*astuple(t)[_ENDED_AT:], month)
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
            f"SELECT {_TRIP_COLUMNS} FROM trips",
            [("started_ms >= %s", from_ms), ("started_ms < %s", to_ms), ("vehicle_id = %s", vehicle_id),
             ("user_id = %s", user_id)],
            "started_ms, reservation_id",
            limit,
        )  # fmt: skip
        return [_trip(r) for r in await self._rows("list trips", sql, args)]

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

    # -- events and the webhook outbox --

    @staticmethod
    async def _insert_events(conn: Conn, events: list[Event]) -> None:
        """Within a transaction: the events and one pending delivery per target, due now."""
        if not events:
            return
        async with conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO events (id, type, ts_ms, body) VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
                [(e.id, e.type, e.ts_ms, e.body) for e in events],
            )
            deliveries = [(e.id, url, e.ts_ms) for e in events for url in e.targets]
            if deliveries:
                await cur.executemany(
                    "INSERT INTO deliveries (event_id, endpoint, due_ms) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                    deliveries,
                )

    async def add_event(self, e: Event) -> None:
        async with self._tx("record an event") as conn:
            await self._insert_events(conn, [e])

    async def list_events(self, after: str | None, type_: str | None, limit: int) -> list[Event]:
        await self._flush_audit()
        sql, args = _listing(
            "SELECT id, type, ts_ms, body FROM events", [("id > %s", after), ("type = %s", type_)], "id", limit
        )
        return [Event(r[0], r[1], int(r[2]), bytes(r[3])) for r in await self._rows("list events", sql, args)]

    async def due_deliveries(self, endpoint: str, now_ms: int, limit: int) -> list[Delivery]:
        await self._flush_audit()
        rows = await self._rows(
            "read due deliveries",
            "SELECT d.event_id, d.endpoint, d.attempts, d.due_ms, e.ts_ms, e.body FROM deliveries d "
            "JOIN events e ON e.id = d.event_id WHERE d.endpoint = %s AND d.state = 'pending' AND d.due_ms <= %s "
            "ORDER BY d.due_ms, d.event_id LIMIT %s",
            (endpoint, now_ms, limit),
        )
        return [Delivery(r[0], r[1], int(r[2]), int(r[3]), int(r[4]), bytes(r[5])) for r in rows]

    async def next_delivery_ms(self, endpoint: str, after_ms: int) -> int | None:
        await self._flush_audit()
        row = await self._one(
            "read the next delivery",
            "SELECT min(due_ms) FROM deliveries WHERE endpoint = %s AND state = 'pending' AND due_ms > %s",
            (endpoint, after_ms),
        )
        return None if row is None or row[0] is None else int(row[0])

    async def record_attempts(self, attempts: Sequence[Attempt]) -> None:
        if not attempts:
            return
        rows = [
            (a.state, a.attempts, a.due_ms, None if a.state == "pending" else a.at_ms, a.error[:500] or None,
             a.event_id, a.endpoint)
            for a in attempts
        ]  # fmt: skip
        async with self._tx("record delivery attempts") as conn, conn.cursor() as cur:
            await cur.executemany(
                "UPDATE deliveries SET state = %s, attempts = %s, due_ms = %s, done_ms = %s, last_error = %s "
                "WHERE event_id = %s AND endpoint = %s AND state = 'pending'",
                rows,
            )

    async def give_up_deliveries(
        self, endpoint: str | None, keep: Collection[str], end: DeliveryEnd, now_ms: int, why: str
    ) -> int:
        await self._flush_audit()
        arg: object
        if endpoint is not None:
            where, arg = "endpoint = %s", endpoint
        else:
            where, arg = "NOT (endpoint = ANY(%s))", list(keep)
        return await self._count(
            "give up deliveries",
            f"UPDATE deliveries SET state = %s, done_ms = %s, last_error = %s WHERE state = 'pending' AND {where}",
            (end, now_ms, why[:500], arg),
        )

    async def expire_deliveries(self, endpoint: str, events_before_ms: int, now_ms: int) -> int:
        await self._flush_audit()
        # An event's id is never earlier than its time (ULIDs, monotonic), so below this id means older.
        return await self._count(
            "expire deliveries",
            "UPDATE deliveries SET state = 'expired', done_ms = %s, last_error = 'older than max_age_s' "
            "WHERE endpoint = %s AND state = 'pending' AND event_id < %s",
            (now_ms, endpoint, "evt_" + ulid_floor(events_before_ms)),
        )

    async def webhook_backlog(self) -> int:
        row = await self._one("count the webhook backlog", "SELECT count(*) FROM deliveries WHERE state = 'pending'")
        return 0 if row is None else int(row[0])

    # -- alerts --

    async def open_alert(self, a: Alert, e: Event) -> bool:
        async with self._tx("open an alert") as conn:
            # No conflict target: the id's key and the open-alert unique index both mean "already there".
            cur = await conn.execute(
                f"INSERT INTO alerts ({_ALERT_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                (a.id, a.type, a.vehicle_id, a.reservation_id or "", a.opened_ms, a.message, orjson.dumps(a.details),
                 None),
            )  # fmt: skip
            if cur.rowcount != 1:
                return False
            await self._insert_events(conn, [e])
        return True

    async def resolve_alert(self, a: Alert, resolved_ms: int, e: Event) -> bool:
        async with self._tx("resolve an alert") as conn:
            cur = await conn.execute(
                "UPDATE alerts SET resolved_ms = %s WHERE id = %s AND resolved_ms IS NULL", (resolved_ms, a.id)
            )
            if cur.rowcount != 1:
                return False
            await self._insert_events(conn, [e])
        return True

    async def list_alerts(
        self, status: AlertStatus, vehicle_id: str | None, type_: str | None, limit: int
    ) -> list[Alert]:
        sql, args = _listing(
            f"SELECT {_ALERT_COLUMNS} FROM alerts",
            [("vehicle_id = %s", vehicle_id), ("type = %s", type_),
             ("resolved_ms IS NULL", True if status == "open" else None),
             ("resolved_ms IS NOT NULL", True if status == "resolved" else None)],
            "opened_ms DESC, id DESC",
            limit,
        )  # fmt: skip
        return [to_alert(r) for r in await self._rows("list alerts", sql, args)]

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
