"""The SQLite backend's own promises, beyond the contract both backends keep (test_store_contract.py).

Migrations of files as earlier versions left them, released schema versions
frozen, refusing a file it cannot use, and an audit the file refuses for a
while. PostgreSQL's own promises are in ``tests/test_store_postgres.py``.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from gateway.errors import StartupError
from gateway.rules.commands import Outcome
from gateway.rules.reservations import StartUnlock
from gateway.store.sqlite import open_sqlite
from gateway.store.sqlite_schema import MIGRATIONS
from tests.helpers import assert_unedited, async_wait_for
from tests.test_store_contract import T0, H, event, rec

# The schema of version 1 as it shipped, frozen here: an edit to MIGRATIONS[0] must not go unnoticed.
V1_SCHEMA = """
CREATE TABLE reservations (id TEXT PRIMARY KEY, vehicle_id TEXT NOT NULL, user_id TEXT NOT NULL,
    starts_ms INTEGER NOT NULL, ends_ms INTEGER NOT NULL, kind TEXT NOT NULL, unlock_at_start INTEGER NOT NULL,
    cancelled INTEGER NOT NULL DEFAULT 0, created_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL,
    su_status TEXT, su_at_ms INTEGER, su_command_id TEXT, su_reason TEXT);
CREATE INDEX reservations_vehicle ON reservations (vehicle_id, ends_ms);
CREATE INDEX reservations_due ON reservations (unlock_at_start, su_status, starts_ms);
CREATE TABLE idempotency (key TEXT NOT NULL, caller TEXT NOT NULL, fingerprint TEXT NOT NULL,
    status INTEGER NOT NULL, body BLOB NOT NULL, created_ms INTEGER NOT NULL, PRIMARY KEY (caller, key));
PRAGMA user_version = 1;
"""


def test_a_version_1_file_is_migrated_with_its_data(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(V1_SCHEMA)
    db.execute(
        "INSERT INTO reservations (id, vehicle_id, user_id, starts_ms, ends_ms, kind, unlock_at_start, created_ms, "
        "updated_ms, su_status, su_at_ms, su_command_id) VALUES ('R-old', 'ZOE-001', 'U-1', ?, ?, 'staff', 1, 1, 1, "
        "'done', 5, 'c-0')",
        (T0, T0 + H),
    )
    db.execute("INSERT INTO idempotency VALUES ('k', '0123456789ab', 'fp', 200, ?, 1)", (b'{"command_id": "c-7"}',))
    db.close()

    async def check() -> None:
        store = open_sqlite(path)
        r = await store.get_reservation("R-old")
        assert r is not None and (r.kind, r.unlock_at_start, r.created_by) == ("staff", True, None)
        assert r.start_unlock == StartUnlock("done", 5, "c-0", None)
        # Old answers were kept under the key's hash, which no key name can match: forgotten, not misread.
        assert await store.claim_idempotency_key("0123456789ab", "k", "fp", "h", T0) == "claimed"
        o = Outcome("c-1", "ZOE-001", "lock", "done", None, 3.0)
        await store.save_idempotent_outcome("booking", "k", "fp", o, T0)
        assert await store.claim_idempotency_key("booking", "k", "fp", "h", T0) == ("fp", o)
        await store.record_command(rec("c-1"))
        assert [c.command_id for c in await store.list_commands("ZOE-001", None, None, 10)] == ["c-1"]
        await store.close()
        assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)

    asyncio.run(check())


def test_a_corrupt_file_is_a_startup_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "gateway.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StartupError, match=r"gateway\.sqlite3") as e:
        open_sqlite(path)
    assert "not a usable SQLite database" in str(e.value)


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "gateway.sqlite3"
    sqlite3.connect(path).execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(StartupError, match="newer than this gateway"):
        open_sqlite(path)


async def test_an_audit_the_file_refuses_waits_in_memory_up_to_its_cap(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "gateway.sqlite3"
    store = open_sqlite(path, audit_max_pending=3)  # the real cap is AUDIT_MAX_PENDING, 100,000 records
    store.db.execute("PRAGMA busy_timeout = 50")  # each refused flush fails fast instead of waiting 5 s
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # another process holding the file: every write is refused
    try:
        for i in range(5):
            await store.record_command(rec(f"c-{i}", issued=T0 + i), event(i))
        await async_wait_for(lambda: "2 oldest records dropped" in caplog.text, 5, "the oldest two dropped")
        assert "5 audit records kept in memory, retrying" in caplog.text
    finally:
        other.execute("ROLLBACK")
        other.close()
    # Once the file takes writes again, the newest three are written, each with its event.
    assert [c.command_id for c in await store.list_commands("ZOE-001", None, None, 10)] == ["c-4", "c-3", "c-2"]
    assert [e.doc()["data"] for e in await store.list_events(None, None, 10)] == [{"n": 2}, {"n": 3}, {"n": 4}]
    await store.close()


def test_the_v5_migration_gives_old_cancellations_their_reason(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN")
    for _, steps in MIGRATIONS[:4]:
        for step in steps:
            if isinstance(step, str):
                db.execute(step)
            else:
                step(db)
    db.execute("PRAGMA user_version = 4")
    db.execute("COMMIT")
    db.execute(
        "INSERT INTO reservations (id, vehicle_id, user_id, starts_ms, ends_ms, kind, unlock_at_start, cancelled, "
        "created_ms, updated_ms) VALUES ('R-old', 'ZOE-001', 'U-1', 1, 2, 'public', 0, 1, 0, 0)"
    )
    db.close()
    store = open_sqlite(path)
    got = asyncio.run(store.get_reservation("R-old"))
    assert got is not None and got.cancelled and got.cancel_reason == "cancelled"
    asyncio.run(store.close())


# Each released schema version, as it shipped: a version is never edited, a change is a new one.
RELEASED = {
    1: "8477f18777579388", 2: "54bed9e0b62c3c5a", 3: "2446e9a303d05f29",  # 0.1.0, 0.2.0, 0.3.0
    4: "f05822166f519b29", 5: "2c35d84013547380",  # 0.4.0, 0.5.0
    6: "9bd7fa05e982ced8",  # 0.7.0
}  # fmt: skip


def test_released_schema_versions_are_never_edited() -> None:
    assert_unedited(MIGRATIONS, RELEASED)
