"""The PostgreSQL store's events, webhook outbox and alerts (the ``Store`` protocol's notify side).

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
from gateway.store.postgres_sql import Conn, PostgresBase, _listing
from gateway.store.rows import ALERT_COLUMNS, to_alert

__all__ = ["EventTables"]


class EventTables(PostgresBase):
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
                f"INSERT INTO alerts ({ALERT_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
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
            f"SELECT {ALERT_COLUMNS} FROM alerts",
            [("vehicle_id = %s", vehicle_id), ("type = %s", type_),
             ("resolved_ms IS NULL", True if status == "open" else None),
             ("resolved_ms IS NOT NULL", True if status == "resolved" else None)],
            "opened_ms DESC, id DESC",
            limit,
        )  # fmt: skip
        return [to_alert(r) for r in await self._rows("list alerts", sql, args)]
