"""The SQLite store's events, webhook outbox and alerts (the ``Store`` protocol's notify side).

Events are written with one pending delivery per target in the caller's
transaction (:meth:`EventTables._insert_events`); event ids are ULIDs of
their time, so listing after an id, pruning and expiring are ranges on the key.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import orjson

from gateway.rules.alerts import Alert
from gateway.rules.events import Event, ulid_floor
from gateway.rules.webhooks import Attempt, Delivery
from gateway.store.base import AlertStatus, DeliveryEnd
from gateway.store.rows import ALERT_COLUMNS, to_alert
from gateway.store.sqlite_sql import SqliteBase, errors, listing

__all__ = ["EventTables"]


class EventTables(SqliteBase):
    def _insert_events(self, events: list[Event]) -> None:
        """Within a transaction: the events and one pending delivery per target, due now."""
        if not events:
            return
        self.db.executemany(
            "INSERT OR IGNORE INTO events (id, type, ts_ms, body) VALUES (?,?,?,?)",
            [(e.id, e.type, e.ts_ms, e.body) for e in events],
        )
        deliveries = [(e.id, url, e.ts_ms) for e in events for url in e.targets]
        if deliveries:
            self.db.executemany(
                "INSERT OR IGNORE INTO deliveries (event_id, endpoint, due_ms) VALUES (?,?,?)", deliveries
            )

    async def add_event(self, e: Event) -> None:
        with errors("record an event"), self._tx():
            self._insert_events([e])

    async def list_events(self, after: str | None, type_: str | None, limit: int) -> list[Event]:
        self._flush_audit()
        sql, args = listing(
            "SELECT id, type, ts_ms, body FROM events", [("id > ?", after), ("type = ?", type_)], "id", limit
        )
        with errors("list events"):
            return [Event(r[0], r[1], int(r[2]), bytes(r[3])) for r in self.db.execute(sql, args).fetchall()]

    async def due_deliveries(self, endpoint: str, now_ms: int, limit: int) -> list[Delivery]:
        self._flush_audit()  # an event written behind is due as soon as it is recorded
        with errors("read due deliveries"):
            rows = self.db.execute(
                "SELECT d.event_id, d.endpoint, d.attempts, d.due_ms, e.ts_ms, e.body FROM deliveries d "
                "JOIN events e ON e.id = d.event_id WHERE d.endpoint = ? AND d.state = 'pending' AND d.due_ms <= ? "
                "ORDER BY d.due_ms, d.event_id LIMIT ?",
                (endpoint, now_ms, limit),
            ).fetchall()
        return [Delivery(r[0], r[1], int(r[2]), int(r[3]), int(r[4]), bytes(r[5])) for r in rows]

    async def next_delivery_ms(self, endpoint: str, after_ms: int) -> int | None:
        self._flush_audit()
        with errors("read the next delivery"):
            row = self.db.execute(
                "SELECT min(due_ms) FROM deliveries WHERE endpoint = ? AND state = 'pending' AND due_ms > ?",
                (endpoint, after_ms),
            ).fetchone()
        return None if row[0] is None else int(row[0])

    async def record_attempts(self, attempts: Sequence[Attempt]) -> None:
        if not attempts:
            return
        rows = [
            (a.state, a.attempts, a.due_ms, None if a.state == "pending" else a.at_ms, a.error[:500] or None,
             a.event_id, a.endpoint)
            for a in attempts
        ]  # fmt: skip
        with errors("record delivery attempts"), self._tx():
            self.db.executemany(
                "UPDATE deliveries SET state = ?, attempts = ?, due_ms = ?, done_ms = ?, last_error = ? "
                "WHERE event_id = ? AND endpoint = ? AND state = 'pending'",
                rows,
            )

    async def give_up_deliveries(
        self, endpoint: str | None, keep: Collection[str], end: DeliveryEnd, now_ms: int, why: str
    ) -> int:
        self._flush_audit()
        if endpoint is not None:
            where, args = "endpoint = ?", [endpoint]
        else:
            where, args = f"endpoint NOT IN ({','.join('?' * len(keep))})", list(keep)
        with errors("give up deliveries"):
            cur = self.db.execute(
                f"UPDATE deliveries SET state = ?, done_ms = ?, last_error = ? WHERE state = 'pending' AND {where}",
                (end, now_ms, why[:500], *args),
            )
        return cur.rowcount

    async def expire_deliveries(self, endpoint: str, events_before_ms: int, now_ms: int) -> int:
        self._flush_audit()
        # An event's id is never earlier than its time (ULIDs, monotonic), so below this id means older.
        with errors("expire deliveries"):
            cur = self.db.execute(
                "UPDATE deliveries SET state = 'expired', done_ms = ?, last_error = 'older than max_age_s' "
                "WHERE endpoint = ? AND state = 'pending' AND event_id < ?",
                (now_ms, endpoint, "evt_" + ulid_floor(events_before_ms)),
            )
        return cur.rowcount

    async def webhook_backlog(self) -> int:
        with errors("count the webhook backlog"):
            return int(self.db.execute("SELECT count(*) FROM deliveries WHERE state = 'pending'").fetchone()[0])

    # -- alerts --

    async def open_alert(self, a: Alert, e: Event) -> bool:
        with errors("open an alert"), self._tx():
            cur = self.db.execute(
                f"INSERT OR IGNORE INTO alerts ({ALERT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)",
                (a.id, a.type, a.vehicle_id, a.reservation_id or "", a.opened_ms, a.message, orjson.dumps(a.details),
                 None),
            )  # fmt: skip
            if cur.rowcount != 1:
                return False
            self._insert_events([e])
        return True

    async def resolve_alert(self, a: Alert, resolved_ms: int, e: Event) -> bool:
        with errors("resolve an alert"), self._tx():
            cur = self.db.execute(
                "UPDATE alerts SET resolved_ms = ? WHERE id = ? AND resolved_ms IS NULL", (resolved_ms, a.id)
            )
            if cur.rowcount != 1:
                return False
            self._insert_events([e])
        return True

    async def list_alerts(
        self, status: AlertStatus, vehicle_id: str | None, type_: str | None, limit: int
    ) -> list[Alert]:
        sql, args = listing(
            f"SELECT {ALERT_COLUMNS} FROM alerts",
            [("vehicle_id = ?", vehicle_id), ("type = ?", type_),
             ("resolved_ms IS NULL", True if status == "open" else None),
             ("resolved_ms IS NOT NULL", True if status == "resolved" else None)],
            "opened_ms DESC, id DESC",
            limit,
        )  # fmt: skip
        with errors("list alerts"):
            return [to_alert(r) for r in self.db.execute(sql, args).fetchall()]
