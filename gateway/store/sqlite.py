"""The embedded store: one SQLite file in the state directory.

Reservations, idempotency, the command audit and trips are here; events,
the webhook outbox and alerts in ``sqlite_events.py``; leases, the shared
vehicle state and claimed idempotency keys in ``sqlite_shared.py``; the transaction and
error mapping both share, in ``sqlite_sql.py``.
The schema and its versions are in ``sqlite_schema.py``; opening the store
brings any older file up to date. Every call is a short local transaction, so it runs on the
event loop instead of a thread pool: one loop, no threads beside it. WAL
with ``synchronous=FULL``: a reservation is on disk before the call
returns. The command audit, written on every unlock's path, is written
behind: within :data:`AUDIT_FLUSH_S`, many records in one transaction
(see :meth:`SqliteStore.record_command`).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from dataclasses import astuple
from pathlib import Path
from typing import BinaryIO

import orjson

from gateway.errors import StaleRead, StartupError, StoreError
from gateway.filelock import hold
from gateway.rules.commands import CommandRecord, Outcome
from gateway.rules.events import Event, ulid_floor
from gateway.rules.priority import PREEMPTED_BY_STAFF, Plan, Refusal, make_room
from gateway.rules.reservations import Reservation, StartUnlock, conflict
from gateway.rules.trips import Trip
from gateway.rules.usage import UsageRows, UsageUser, UsageVehicle
from gateway.store.base import (
    AUDIT_FLUSH_S,
    AUDIT_MAX_PENDING,
    AUDIT_RETENTION_MS,
    AUDIT_RETRY_S,
    IDEMPOTENCY_RETENTION_MS,
    UNCHECKED,
    Room,
    Unchecked,
    audit_refused,
)
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
from gateway.store.sqlite_events import EventTables
from gateway.store.sqlite_schema import migrate
from gateway.store.sqlite_shared import SharedTables
from gateway.store.sqlite_sql import errors, listing

__all__ = ["SqliteStore", "open_sqlite"]

log = logging.getLogger(__name__)


def open_sqlite(
    path: Path, names: str = "store", exclusive: bool = False, audit_max_pending: int = AUDIT_MAX_PENDING
) -> SqliteStore:
    """Open (creating and migrating as needed) the store at `path`; StartupError starting with `names` (the
    setting that chose the file) if not. `exclusive`: refuse a file another process holds so, for as long
    as this store is open: a gateway's, since two gateways on one file would both do the once-only work."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StartupError(f"{names}: cannot create the directory {path.parent}: {e.strerror or e}") from e
    # Beside the real file: a symbolic link and its target are one database.
    lock = hold(path.resolve().with_name(path.resolve().name + ".lock"), names, path) if exclusive else None
    try:
        db = sqlite3.connect(path, isolation_level=None)
    except sqlite3.Error as e:
        _release(lock)
        raise StartupError(f"{names}: cannot open {path}: {e}") from e
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        migrate(db)
    except sqlite3.Error as e:
        db.close()
        _release(lock)
        raise StartupError(f"{names}: {path} is not a usable SQLite database ({e})") from e
    except StartupError as e:
        db.close()
        _release(lock)
        raise StartupError(f"{names}: {path}: {e}") from None
    return SqliteStore(db, lock, audit_max_pending)


def _release(lock: BinaryIO | None) -> None:
    if lock is not None:
        lock.close()  # closing the file ends the lock


class SqliteStore(EventTables, SharedTables):
    def __init__(
        self, db: sqlite3.Connection, lock: BinaryIO | None = None, audit_max_pending: int = AUDIT_MAX_PENDING
    ) -> None:
        self.db = db
        self._lock = lock
        self._audit: list[CommandRecord] = []
        self._audit_events: list[Event] = []
        self._audit_max_pending = audit_max_pending
        self._flush_handle: asyncio.TimerHandle | None = None

    async def close(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        try:
            self._flush_audit()
        except StoreError as e:
            log.error("%s; %d audit records lost at shutdown", e, len(self._audit))
        finally:
            try:
                self.db.close()
            finally:
                _release(self._lock)

    # -- reservations --

    def _check_unchanged(self, reservation_id: str, expected: Reservation | Unchecked | None) -> None:
        if isinstance(expected, Unchecked):
            return
        row = self.db.execute(
            f"SELECT {RESERVATION_COLUMNS} FROM reservations WHERE id = ?", (reservation_id,)
        ).fetchone()
        if (None if row is None else to_reservation(row)) != expected:
            raise StaleRead(f"reservation {reservation_id} changed since it was read")

    async def get_reservation(self, reservation_id: str) -> Reservation | None:
        with errors("read a reservation"):
            row = self.db.execute(
                f"SELECT {RESERVATION_COLUMNS} FROM reservations WHERE id = ?", (reservation_id,)
            ).fetchone()
        return None if row is None else to_reservation(row)

    async def put_reservation(
        self, r: Reservation, now_ms: int, expected: Reservation | Unchecked | None = UNCHECKED
    ) -> Reservation | None:
        with errors("store a reservation"), self._tx():
            self._check_unchanged(r.id, expected)
            clash = conflict(r, self._live_of(r.vehicle_id, now_ms), now_ms)
            if clash is not None:
                return clash
            self._insert_reservation(r)
        return None

    async def put_with_priority(
        self, r: Reservation, now_ms: int, room: Room, expected: Reservation | Unchecked | None = UNCHECKED
    ) -> Plan | Refusal:
        with errors("store a staff reservation"), self._tx():
            self._check_unchanged(r.id, expected)
            in_the_way = [o for o in self._live_of(r.vehicle_id, now_ms) if o.id != r.id and o.overlaps(r)]
            # Without `r` itself: a staff reservation moving to another car frees the one it leaves.
            others = {
                vid: [o for o in self._live_of(vid, now_ms) if o.id != r.id]
                for vid in room.candidates
                if vid != r.vehicle_id
            }
            marks = ",".join("?" * len(in_the_way))
            started = {
                row[0]
                for row in self.db.execute(
                    f"SELECT reservation_id FROM trips WHERE reservation_id IN ({marks})", [o.id for o in in_the_way]
                )
            }
            decision = make_room(r, in_the_way, others, started, now_ms, room.notice_ms, room.early_grace_ms)
            if isinstance(decision, Refusal):
                return decision
            for m in decision.moves:
                if m.action == "reassigned":
                    self.db.execute(
                        "UPDATE reservations SET vehicle_id = ?, updated_ms = ? WHERE id = ?",
                        (m.vehicle_id, now_ms, m.reservation_id),
                    )
                else:
                    self.db.execute(
                        "UPDATE reservations SET cancelled = 1, cancel_reason = ?, updated_ms = ? WHERE id = ?",
                        (PREEMPTED_BY_STAFF, now_ms, m.reservation_id),
                    )
            self._insert_reservation(r)
            self._insert_events(room.events(decision))
        return decision

    def _live_of(self, vehicle_id: str, now_ms: int) -> list[Reservation]:
        rows = self.db.execute(
            f"SELECT {RESERVATION_COLUMNS} FROM reservations WHERE vehicle_id = ? AND ends_ms > ? AND NOT cancelled "
            "AND NOT completed ORDER BY starts_ms, id",
            (vehicle_id, now_ms),
        ).fetchall()
        return [to_reservation(row) for row in rows]

    def _insert_reservation(self, r: Reservation) -> None:
        su = r.start_unlock
        self.db.execute(
            f"INSERT OR REPLACE INTO reservations ({RESERVATION_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                r.id, r.vehicle_id, r.user_id, r.starts_ms, r.ends_ms, r.kind, int(r.unlock_at_start),
                int(r.cancelled), r.created_ms, r.updated_ms,
                su.status if su else None, su.at_ms if su else None, su.command_id if su else None,
                su.reason if su else None, r.created_by, int(r.completed), r.cancel_reason,
            ),
        )  # fmt: skip

    async def cancel_reservation(self, reservation_id: str, now_ms: int, reason: str = "cancelled") -> bool:
        with errors("cancel a reservation"):
            cur = self.db.execute(
                "UPDATE reservations SET cancelled = 1, cancel_reason = ?, updated_ms = ? "
                "WHERE id = ? AND NOT cancelled",
                (reason, now_ms, reservation_id),
            )
        return cur.rowcount == 1

    async def list_reservations(
        self, vehicle_id: str | None, from_ms: int | None, to_ms: int | None, limit: int
    ) -> list[Reservation]:
        sql, args = listing(
            f"SELECT {RESERVATION_COLUMNS} FROM reservations",
            [("vehicle_id = ?", vehicle_id), ("ends_ms > ?", from_ms), ("starts_ms < ?", to_ms)],
            "starts_ms, id",
            limit,
        )
        with errors("list reservations"):
            return [to_reservation(r) for r in self.db.execute(sql, args).fetchall()]

    # -- the start-time unlock --

    async def due_start_unlocks(self, now_ms: int) -> list[Reservation]:
        with errors("read due start unlocks"):
            rows = self.db.execute(
                f"SELECT {RESERVATION_COLUMNS} FROM reservations WHERE unlock_at_start = 1 AND su_status IS NULL "
                "AND NOT cancelled AND starts_ms <= ? AND ends_ms > ? ORDER BY starts_ms",
                (now_ms, now_ms),
            ).fetchall()
        return [to_reservation(r) for r in rows]

    async def next_start_unlock_ms(self, now_ms: int) -> int | None:
        with errors("read the next start unlock"):
            row = self.db.execute(
                "SELECT min(starts_ms) FROM reservations "
                "WHERE unlock_at_start = 1 AND su_status IS NULL AND NOT cancelled AND ends_ms > ?",
                (now_ms,),
            ).fetchone()
        return None if row[0] is None else int(row[0])

    async def pending_start_unlocks(self) -> list[Reservation]:
        with errors("read pending start unlocks"):
            rows = self.db.execute(
                # unlock_at_start too (every claimed one has it): the reservations_due index, not a scan
                f"SELECT {RESERVATION_COLUMNS} FROM reservations WHERE unlock_at_start = 1 AND su_status = 'pending'"
            ).fetchall()
        return [to_reservation(r) for r in rows]

    async def claim_start_unlock(self, reservation_id: str, claim: StartUnlock) -> bool:
        return self._set_start_unlock(reservation_id, claim, " AND su_status IS NULL")

    async def set_start_unlock(self, reservation_id: str, su: StartUnlock | None) -> None:
        self._set_start_unlock(reservation_id, su, "")

    def _set_start_unlock(self, reservation_id: str, su: StartUnlock | None, where: str) -> bool:
        values = (su.status, su.at_ms, su.command_id, su.reason) if su else (None, None, None, None)
        with errors("record a start unlock"):
            cur = self.db.execute(
                "UPDATE reservations SET su_status = ?, su_at_ms = ?, su_command_id = ?, su_reason = ? WHERE id = ?"
                + where,
                (*values, reservation_id),
            )
        return cur.rowcount == 1

    # -- idempotency --

    async def save_idempotent_outcome(
        self, caller: str, key: str, fingerprint: str, outcome: Outcome, now_ms: int
    ) -> None:
        with errors("save an idempotency key"), self._tx():
            self.db.execute(
                "INSERT OR REPLACE INTO idempotency (caller, key, fingerprint, outcome, created_ms) VALUES (?,?,?,?,?)",
                (caller, key, fingerprint, orjson.dumps(outcome.to_doc()), now_ms),
            )
            # Whoever claimed the key is done; anyone claiming it now finds the outcome.
            self.db.execute("DELETE FROM idempotency_claims WHERE caller = ? AND key = ?", (caller, key))

    # -- the command audit --

    async def record_command(self, rec: CommandRecord, event: Event | None = None) -> None:
        # The one write on every unlock's path, so it is written behind: rows gather for at most
        # AUDIT_FLUSH_S and go in one transaction (a busy disk must not stall the event loop, and
        # with it every other unlock and all ingest). Reads, pruning and closing flush first.
        # The command's event goes in the same transaction: an audited command always has its event.
        self._audit.append(rec)
        if event is not None:
            self._audit_events.append(event)
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_later(AUDIT_FLUSH_S, self._flush_audit_soon)

    def _flush_audit_soon(self) -> None:
        self._flush_handle = None
        try:
            self._flush_audit()
        except StoreError as e:
            audit_refused(e, self._audit, self._audit_events, self._audit_max_pending)
            self._flush_handle = asyncio.get_running_loop().call_later(AUDIT_RETRY_S, self._flush_audit_soon)

    def _flush_audit(self) -> None:
        if not self._audit:
            return
        rows = [
            (
                r.command_id,
                r.vehicle_id,
                r.action,
                r.reservation_id,
                r.caller,
                r.source,
                r.issued_ms,
                r.result,
                r.reason,
                r.latency_ms,
            )
            for r in self._audit
        ]
        with errors("record commands"), self._tx():
            self.db.executemany(
                f"INSERT OR REPLACE INTO commands ({COMMAND_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)", rows
            )
            self._insert_events(self._audit_events)
        self._audit.clear()
        self._audit_events.clear()

    async def list_commands(
        self, vehicle_id: str, from_ms: int | None, to_ms: int | None, limit: int
    ) -> list[CommandRecord]:
        self._flush_audit()
        sql, args = listing(
            f"SELECT {COMMAND_COLUMNS} FROM commands",
            [("vehicle_id = ?", vehicle_id), ("issued_ms >= ?", from_ms), ("issued_ms < ?", to_ms)],
            "issued_ms DESC, command_id DESC",
            limit,
        )
        with errors("list commands"):
            return [to_command(r) for r in self.db.execute(sql, args).fetchall()]

    # -- trips --

    async def start_trip(self, t: Trip, event: Event | None = None) -> bool:
        # Every `done` unlock of a reservation comes here and all but the first find its trip: a read,
        # not a write transaction, for those.
        with errors("start a trip"):
            if self.db.execute("SELECT 1 FROM trips WHERE reservation_id = ?", (t.reservation_id,)).fetchone():
                return False
        with errors("start a trip"), self._tx():
            cur = self.db.execute(
                f"INSERT OR IGNORE INTO trips ({TRIP_COLUMNS}) VALUES ({','.join('?' * len(TRIP_FIELDS))})",
                astuple(t),
            )
            if cur.rowcount != 1:
                return False
            if event is not None:
                self._insert_events([event])
        return True

    async def get_trip(self, reservation_id: str) -> Trip | None:
        with errors("read a trip"):
            row = self.db.execute(
                f"SELECT {TRIP_COLUMNS} FROM trips WHERE reservation_id = ?", (reservation_id,)
            ).fetchone()
        return None if row is None else to_trip(row)

    async def running_trips(self, booked_end_before_ms: int) -> list[Trip]:
        with errors("read running trips"):
            rows = self.db.execute(
                f"SELECT {TRIP_COLUMNS} FROM trips WHERE ended_ms IS NULL AND booked_end_ms < ? ORDER BY booked_end_ms",
                (booked_end_before_ms,),
            ).fetchall()
        return [to_trip(r) for r in rows]

    async def end_trip(self, t: Trip, month: str, event: Event | None = None) -> bool:
        # What ending sets: ended_ms and every field after it, and the month the statement counts it in.
        names = [*TRIP_FIELDS[ENDED_AT:], "month"]
        values = (*astuple(t)[ENDED_AT:], month)
        with errors("end a trip"), self._tx():
            cur = self.db.execute(
                f"UPDATE trips SET {', '.join(f'{n} = ?' for n in names)} "
                "WHERE reservation_id = ? AND ended_ms IS NULL",
                (*values, t.reservation_id),
            )
            if cur.rowcount != 1:
                return False
            # Summed from the row just stored, so the sums can only ever agree with the trips.
            self.db.execute(
                "INSERT INTO usage_cars SELECT month, vehicle_id, station, kind, 1, coalesce(duration_min, 0), "
                "coalesce(distance_km, 0), coalesce(energy_kwh, 0), coalesce(amount_cents, 0) FROM trips "
                "WHERE reservation_id = ? ON CONFLICT (month, vehicle_id, station, kind) DO UPDATE SET "
                "trips = trips + 1, duration_min = duration_min + excluded.duration_min, "
                "distance_km = distance_km + excluded.distance_km, energy_kwh = energy_kwh + excluded.energy_kwh, "
                "amount_cents = amount_cents + excluded.amount_cents",
                (t.reservation_id,),
            )
            self.db.execute(
                "UPDATE reservations SET completed = 1, updated_ms = ? WHERE id = ?", (t.ended_ms, t.reservation_id)
            )
            if event is not None:
                self._insert_events([event])
        return True

    async def list_trips(
        self, from_ms: int | None, to_ms: int | None, vehicle_id: str | None, user_id: str | None, limit: int
    ) -> list[Trip]:
        sql, args = listing(
            f"SELECT {TRIP_COLUMNS} FROM trips",
            [("started_ms >= ?", from_ms), ("started_ms < ?", to_ms), ("vehicle_id = ?", vehicle_id),
             ("user_id = ?", user_id)],
            "started_ms, reservation_id",
            limit,
        )  # fmt: skip
        with errors("list trips"):
            return [to_trip(r) for r in self.db.execute(sql, args).fetchall()]

    async def usage(self, month: str) -> UsageRows:
        with errors("read the usage of a month"):
            # One min() in the query: SQLite then takes the bare `station` from the row of that minimum,
            # the user's first public trip of the month.
            users = self.db.execute(
                "SELECT user_id, count(*), sum(billed_min), sum(coalesce(distance_km, 0)), sum(amount_cents), "
                "sum(kind = 'public'), min(CASE WHEN kind = 'public' THEN started_ms END), station "
                "FROM trips WHERE month = ? GROUP BY user_id ORDER BY user_id",
                (month,),
            ).fetchall()
            cars = self.db.execute(
                "SELECT vehicle_id, station, kind, trips, duration_min, distance_km, energy_kwh, amount_cents "
                "FROM usage_cars WHERE month = ?",
                (month,),
            ).fetchall()
        return UsageRows(
            users=[
                UsageUser(u, n, int(b), float(d), int(a), int(p), st if p else None)
                for u, n, b, d, a, p, _, st in users
            ],
            vehicles=[UsageVehicle(*row) for row in cars],
        )

    def rebuild_usage(self) -> None:
        """Sum every month's cars again from the stored trips and their months (after a bulk load)."""
        with errors("rebuild the usage sums"), self._tx():
            self.db.execute("DELETE FROM usage_cars")
            self.db.execute(
                "INSERT INTO usage_cars SELECT month, vehicle_id, station, kind, count(*), "
                "sum(coalesce(duration_min, 0)), sum(coalesce(distance_km, 0)), sum(coalesce(energy_kwh, 0)), "
                "sum(coalesce(amount_cents, 0)) "
                "FROM trips WHERE month IS NOT NULL GROUP BY month, vehicle_id, station, kind"
            )

    # -- housekeeping --

    async def prune(self, now_ms: int, events_before_ms: int | None = None) -> int:
        self._flush_audit()
        with errors("prune old rows"), self._tx():
            a = self.db.execute("DELETE FROM idempotency WHERE created_ms < ?", (now_ms - IDEMPOTENCY_RETENTION_MS,))
            b = self.db.execute("DELETE FROM commands WHERE issued_ms < ?", (now_ms - AUDIT_RETENTION_MS,))
            # An expired claim is free already: only its row is left.
            c = self.db.execute("DELETE FROM idempotency_claims WHERE expires_ms <= ?", (now_ms,))
            n = a.rowcount + b.rowcount + c.rowcount
            if events_before_ms is not None:
                # Ids are ULIDs, ordered by time: every event before a time has an id below that time's.
                first_kept = "evt_" + ulid_floor(events_before_ms)
                self.db.execute("DELETE FROM deliveries WHERE event_id < ?", (first_kept,))
                n += self.db.execute("DELETE FROM events WHERE id < ?", (first_kept,)).rowcount
        return n
