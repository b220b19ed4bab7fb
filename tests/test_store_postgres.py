"""The PostgreSQL backend's own promises, beyond the contract both backends keep (test_store_contract.py).

Migrations, refusing what it cannot open, and real races: two stores on one
database are two gateways, and PostgreSQL's calls yield, so ``asyncio.gather``
races them for real.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from gateway.app import init_app
from gateway.errors import StartupError, StoreError
from gateway.fleet import load_fleet
from gateway.rules.commands import Outcome
from gateway.store.base import Store
from gateway.store.postgres import _PUT_RESERVATION, _car_lock, _reservation_row, open_postgres
from gateway.store.postgres_schema import MIGRATIONS as PG_MIGRATIONS
from scripts import services
from scripts.postgresql import POSTGRES_PASSWORD
from tests.conftest import Stack, Unique
from tests.helpers import AUTH, REPO, assert_unedited, async_wait_for, gateway_settings
from tests.pg import Postgres, postgres
from tests.test_failed_start import assert_one_line_exit_2, run_gateway

__all__ = ["postgres"]  # the session fixture, used here by name

from tests.test_store_contract import FLEET, T0, H, reading, rec, res, room

# ---- the PostgreSQL backend's own promises: migrations, refusing what it cannot open, real races -----------


# PostgreSQL's schema versions as 0.7.0 shipped them: a released migration is never edited, only followed.
PG_RELEASED = {1: "be65d654cb27df83", 2: "68d7217f9ecd3630"}


def test_released_postgres_schema_versions_are_never_edited() -> None:
    assert_unedited(PG_MIGRATIONS, PG_RELEASED)


async def test_postgres_migrates_an_empty_database_once(postgres: Postgres) -> None:
    url = postgres.empty()
    # Two gateways starting at once on a new database: one migrates, the other finds it done.
    first, second = await asyncio.gather(open_postgres(url, pool_size=1), open_postgres(url, pool_size=1))
    assert await first.put_reservation(res("R-1"), T0) is None
    await first.close()
    assert await second.get_reservation("R-1") == res("R-1")
    await second.close()
    again = await open_postgres(url, pool_size=1)  # up to date: nothing done, nothing lost
    assert await again.get_reservation("R-1") == res("R-1")
    await again.close()
    with psycopg.connect(url) as c:
        versions = [v for (v,) in c.execute("SELECT version FROM schema_version ORDER BY version").fetchall()]
    assert versions == list(range(1, len(PG_MIGRATIONS) + 1))
    postgres.drop_all()


async def test_a_busy_pool_is_no_outage_and_a_broken_connection_is(postgres: Postgres) -> None:
    # While the store seems gone a request waits only LOST_WAIT_S for a connection (503 at once). Every
    # connection busy must not count as gone: the lease's renewal, for one, may rightly wait longer.
    store = await open_postgres(await postgres.fresh(), pool_size=1, connect_timeout_s=0.5)
    try:

        async def busy() -> None:
            async with store._conn("hold the only connection") as c:
                await c.execute("SELECT pg_sleep(1.5)")

        holder = asyncio.create_task(busy())
        await asyncio.sleep(0.2)
        with pytest.raises(StoreError):
            await store.get_reservation("R-1")  # no connection free within 0.5 s
        assert not store._lost
        await holder
        async with store._conn("be cut off") as c:
            pid = c.info.backend_pid
        with psycopg.connect(postgres.service.url_for("postgres"), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(StoreError):
            await store.get_reservation("R-1")  # on the connection the server cut
        assert store._lost
        assert await store.get_reservation("R-1") is None  # the pool makes a new one; the server answers
        assert not store._lost
    finally:
        await store.close()


async def test_postgres_refuses_a_newer_schema(postgres: Postgres) -> None:
    url = postgres.empty()
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("CREATE TABLE schema_version (version integer PRIMARY KEY, description text NOT NULL)")
        c.execute("INSERT INTO schema_version VALUES (%s, 'from a later gateway')", (len(PG_MIGRATIONS) + 1,))
    with pytest.raises(StartupError, match="newer than this gateway knows") as e:
        await open_postgres(url, pool_size=1)
    assert str(e.value).startswith("store.url: ") and POSTGRES_PASSWORD not in str(e.value)
    postgres.drop_all()


@pytest.mark.parametrize("wrong", ["password", "port", "database", "url"])
async def test_postgres_unreachable_is_a_startup_error_naming_store_url_without_the_password(
    postgres: Postgres, wrong: str
) -> None:
    url = postgres.service.url_for("postgres")
    secret = POSTGRES_PASSWORD
    if wrong == "password":
        secret = "wrong-password-4711"
        url = url.replace(POSTGRES_PASSWORD, secret)
    elif wrong == "port":
        url = url.replace(f":{postgres.service.port}/", f":{services.free_port()}/")
    elif wrong == "database":
        url = postgres.service.url_for("no_such_database")
    else:
        url = url.replace(f":{postgres.service.port}/", ":not-a-port/")
    with pytest.raises(StartupError) as e:
        await open_postgres(url, pool_size=1, connect_timeout_s=2)
    message = str(e.value)
    assert message.startswith("store.url: cannot connect to postgresql://gateway:***@127.0.0.1:"), message
    assert secret not in message and "\n" not in message


def test_a_gateway_whose_database_is_unreachable_exits_2_with_one_line(
    stack: Stack, unique: Unique, tmp_path: Path, postgres: Postgres
) -> None:
    url = postgres.service.url_for("postgres").replace(POSTGRES_PASSWORD, "wrong-password-4711")
    p = run_gateway(stack, unique, tmp_path, GATEWAY__STORE__URL=url)
    assert_one_line_exit_2(p, "store.url", "password authentication failed")
    assert "wrong-password-4711" not in p.stderr


async def test_two_gateways_racing_for_one_slot_only_one_wins(postgres: Postgres) -> None:
    url = await postgres.fresh()
    a, b = await open_postgres(url, pool_size=2), await open_postgres(url, pool_size=2)
    try:
        for i in range(10):
            got = await asyncio.gather(
                a.put_reservation(res(f"A-{i}", start_h=10 * i + 1, end_h=10 * i + 3), T0),
                b.put_reservation(res(f"B-{i}", start_h=10 * i + 2, end_h=10 * i + 4), T0),
            )
            assert sum(g is None for g in got) == 1, got
        # Two staff reservations for one car, one from each gateway: staff never displace staff.
        plans = await asyncio.gather(
            a.put_with_priority(res("S-a", start_h=200, end_h=202, kind="staff"), T0, room("ZOE-002")),
            b.put_with_priority(res("S-b", start_h=201, end_h=203, kind="staff"), T0, room("ZOE-002")),
        )
        assert sorted(type(p).__name__ for p in plans) == ["Plan", "Refusal"]
        assert len(await a.list_reservations("ZOE-001", T0 + 200 * H, T0 + 203 * H, 10)) == 1
    finally:
        await a.close()
        await b.close()
        postgres.drop_all()


async def test_a_put_waits_for_whoever_holds_its_car_and_then_sees_what_it_stored(postgres: Postgres) -> None:
    url = await postgres.fresh()
    store = await open_postgres(url, pool_size=2)
    try:
        async with await psycopg.AsyncConnection.connect(url) as other, other.transaction():
            # Another gateway, mid-way through its own transaction on ZOE-001.
            await other.execute("SELECT pg_advisory_xact_lock(%s)", (_car_lock("ZOE-001"),))
            put = asyncio.create_task(store.put_reservation(res("R-mine", start_h=1, end_h=3), T0))
            await asyncio.sleep(0.3)
            assert not put.done()
            await other.execute(_PUT_RESERVATION, _reservation_row(res("R-theirs", start_h=2, end_h=4)))
        clash = await asyncio.wait_for(put, 5)
        assert clash is not None and clash.id == "R-theirs"
        assert await store.get_reservation("R-mine") is None
    finally:
        await store.close()
        postgres.drop_all()


@pytest.mark.integration
async def test_two_gateways_on_one_postgresql_share_the_reservations(
    postgres: Postgres, stack: Stack, unique: Unique, tmp_path: Path, aiohttp_client: Callable[..., Any]
) -> None:
    url = await postgres.fresh()
    clients = []
    for n in (1, 2):
        settings = gateway_settings(
            stack.broker.port, f"http://127.0.0.1:{stack.influx.port}", unique.prefix, unique.database,
            tmp_path / f"gw{n}", instance=f"gw{n}", mqtt__client_id=f"gw{n}-{unique.database}", store__url=url,
        )  # fmt: skip
        clients.append(await aiohttp_client(init_app(settings, FLEET)))
    first, second = clients
    start = datetime.now(UTC) + timedelta(hours=1)
    doc = {"vehicle_id": "ZOE-001", "user_id": "U-42", "starts_at": start.isoformat(),
           "ends_at": (start + timedelta(hours=1)).isoformat(), "kind": "public"}  # fmt: skip
    r = await first.put("/v1/reservations/R-pg", json=doc, headers=AUTH)
    assert r.status == 201, await r.text()
    r = await second.get("/v1/reservations/R-pg", headers=AUTH)
    assert r.status == 200 and (await r.json())["vehicle_id"] == "ZOE-001"
    r = await second.put("/v1/reservations/R-other", json=doc, headers=AUTH)
    problem = (await r.json())["error"]
    assert r.status == 409 and problem["code"] == "reservation_conflict" and "R-pg" in problem["message"], problem
    assert not (tmp_path / "gw1" / "gateway.sqlite3").exists()


# -- the same between two gateways on one PostgreSQL, racing for real --


async def test_two_gateways_racing_for_a_lease_only_one_gets_it(postgres: Postgres) -> None:
    url = await postgres.fresh()
    a, b = await open_postgres(url, pool_size=2), await open_postgres(url, pool_size=2)
    try:
        for i in range(20):
            got = await asyncio.gather(
                a.take_lease(f"L-{i}", "gw-a", T0, 1000), b.take_lease(f"L-{i}", "gw-b", T0, 1000)
            )
            assert sum(got) == 1, got
            # Expired: both try to take it over at once; again one wins.
            got = await asyncio.gather(
                a.take_lease(f"L-{i}", "gw-c", T0 + 1000, 1000), b.take_lease(f"L-{i}", "gw-d", T0 + 1000, 1000)
            )
            assert sum(got) == 1, got
    finally:
        await a.close()
        await b.close()
        postgres.drop_all()


async def test_two_gateways_racing_for_an_idempotency_key_never_both_run_it(postgres: Postgres) -> None:
    url = await postgres.fresh()
    a, b = await open_postgres(url, pool_size=2), await open_postgres(url, pool_size=2)
    o = Outcome("c-1", "ZOE-001", "unlock", "done", None, 12.5, None, T0)
    try:
        for i in range(20):
            got = await asyncio.gather(
                a.claim_idempotency_key("booking", f"k-{i}", "fp", "gw-a", T0),
                b.claim_idempotency_key("booking", f"k-{i}", "fp", "gw-b", T0),
            )
            assert sorted(map(str, got)) == ["claimed", "pending"], got
            # The winner saves its outcome while the other asks again: it waits or replays, never runs it.
            winner, other = (a, b) if got[0] == "claimed" else (b, a)
            _, again = await asyncio.gather(
                winner.save_idempotent_outcome("booking", f"k-{i}", "fp", o, T0 + 1),
                other.claim_idempotency_key("booking", f"k-{i}", "fp", "gw-other", T0 + 1),
            )
            assert again in ("pending", ("fp", o)), again
            assert await other.claim_idempotency_key("booking", f"k-{i}", "fp", "gw-other", T0 + 2) == ("fp", o)
    finally:
        await a.close()
        await b.close()
        postgres.drop_all()


async def test_a_reader_of_the_shared_state_misses_no_write_of_two_racing_gateways(postgres: Postgres) -> None:
    # Each write is to a row of its own and happens once: a reader whose cursor went past a change committed
    # late (a smaller change number made visible after a larger one) would never see that row.
    url = await postgres.fresh()
    a, b, reader = [await open_postgres(url, pool_size=3) for _ in range(3)]
    try:
        seen: set[str] = set()
        cursor = 0
        done = False

        async def write(store: Store, name: str) -> None:
            for n in range(40):
                await store.put_states([reading(f"{name}-{n}", "battery", T0, n=n)], {f"{name}-{n}": T0})

        async def poll() -> None:
            nonlocal cursor
            while not done:
                readings, _, cursor = await reader.states_changed_since(cursor)
                seen.update(r.vehicle_id for r in readings)
                await asyncio.sleep(0)

        poller = asyncio.create_task(poll())
        await asyncio.gather(*(write(s, f"{s_name}{k}") for s, s_name in ((a, "A"), (b, "B")) for k in range(3)))
        done = True
        await poller
        readings, _, cursor = await reader.states_changed_since(cursor)
        seen.update(r.vehicle_id for r in readings)
        assert seen == {f"{w}{k}-{n}" for w in "AB" for k in range(3) for n in range(40)}
    finally:
        for s in (a, b, reader):
            await s.close()
        postgres.drop_all()


async def test_gateways_syncing_their_state_each_get_all_of_the_others_writes(postgres: Postgres) -> None:
    # As StateSync does: write a batch, read back the others' changes, leaving out its own batch and moving
    # the cursor past it. Three at once: a cursor moved past one's own number must skip nobody's change.
    url = await postgres.fresh()
    stores = [await open_postgres(url, pool_size=2) for _ in range(3)]
    try:
        got: list[set[str]] = [set() for _ in stores]
        cursors = [0 for _ in stores]

        async def gateway(i: int) -> None:
            for n in range(40):
                own = await stores[i].put_states([reading(f"G{i}-{n}", "battery", T0, n=n)], {f"G{i}-{n}": T0})
                readings, _, cursors[i] = await stores[i].states_changed_since(cursors[i], own)
                got[i].update(r.vehicle_id for r in readings)

        await asyncio.gather(*(gateway(i) for i in range(3)))
        for i in range(3):  # what the others wrote after one's last turn
            readings, _, _ = await stores[i].states_changed_since(cursors[i])
            got[i].update(r.vehicle_id for r in readings)
            others = {f"G{j}-{n}" for j in range(3) if j != i for n in range(40)}
            assert got[i] >= others, sorted(others - got[i])[:5]
    finally:
        for s in stores:
            await s.close()
        postgres.drop_all()


async def test_a_command_audited_while_a_flush_is_under_way_is_written_soon_after(postgres: Postgres) -> None:
    # The audit is written behind: a record arriving while the flusher waits on the database must still be
    # written within the flush period, not when the next command comes (another gateway would not list it).
    url = await postgres.fresh()
    here, other = await open_postgres(url, pool_size=2), await open_postgres(url, pool_size=2)
    try:
        await here.record_command(rec("c-1"))
        async with asyncio.timeout(2):  # the flush holds its lock for one round trip: look at every turn
            while not here._flushing.locked():  # noqa: ASYNC110 - the store has no event to wait on
                await asyncio.sleep(0)
        await here.record_command(rec("c-2", issued=T0 + 1))

        async def listed_elsewhere() -> bool:
            return len(await other.list_commands("ZOE-001", None, None, 10)) == 2

        await async_wait_for(listed_elsewhere, 2, "both records listed by another gateway")
    finally:
        await here.close()
        await other.close()
        postgres.drop_all()


async def test_an_idempotency_key_retried_on_another_gateway_gets_the_first_answer(postgres: Postgres) -> None:
    # Two gateways (two Booking services, two stores) on one database: the retry reaching the second while
    # the first still waits for the car must neither send the command again nor answer differently.
    from gateway.booking.service import Booking
    from gateway.rules.reservations import ReservationRequest
    from tests.test_unit_booking import ScriptedSender

    url = await postgres.fresh()
    stores = [await open_postgres(url, pool_size=2) for _ in range(2)]
    try:
        fleet = load_fleet(REPO / "config" / "fleet.yaml")
        now = int(datetime.now(UTC).timestamp() * 1000)
        sender = ScriptedSender(gate=asyncio.Event())
        first, second = (
            Booking(s, fleet, sender, lambda line: None, early_grace_s=900, clock=lambda: now) for s in stores
        )
        await first.put("R-1", ReservationRequest("ZOE-001", "U-1", now - H // 2, now + H, "public", False), "b")
        a = asyncio.create_task(first.command("ZOE-001", "unlock", "R-1", "b", idem_key="k-1"))
        await async_wait_for(lambda: len(sender.sent) == 1, 5, "the first call's command")
        b = asyncio.create_task(second.command("ZOE-001", "unlock", "R-1", "b", idem_key="k-1"))
        await asyncio.sleep(0.3)
        assert not b.done()  # waiting for the first, not sending
        sender.gate.set()  # type: ignore[union-attr]
        outcome_a, outcome_b = await asyncio.gather(a, b)
        assert outcome_a == outcome_b and len(sender.sent) == 1
    finally:
        for s in stores:
            await s.close()
