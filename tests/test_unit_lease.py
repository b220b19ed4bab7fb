"""The lease that keeps the once-only work in one gateway: two holders on one real SQLite store."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from gateway.errors import StoreError
from gateway.lease import LEASE, LeaseHolder
from gateway.store.sqlite import open_sqlite
from gateway.times import now_ms
from tests.helpers import async_wait_for

LEASE_S = 1.5  # renewed every 0.25 s, written for 1 s: a stalled loop of a loaded machine has room


class Work:
    """A job that counts how many of its runs are alive at once."""

    def __init__(self) -> None:
        self.running = 0
        self.started = 0
        self.stopped_ms = 0  # on the holder's clock (now_ms), when a run last ended

    async def run(self) -> None:
        self.running += 1
        self.started += 1
        try:
            await asyncio.Event().wait()
        finally:
            self.running -= 1
            self.stopped_ms = now_ms()


def spawn(coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    return asyncio.create_task(coro, name=name)


async def test_one_holder_runs_the_work_and_another_takes_over_when_it_dies(tmp_path: Path) -> None:
    stores = [open_sqlite(tmp_path / "store.sqlite3") for _ in range(2)]
    work = Work()
    a, b = (LeaseHolder(s, name, LEASE_S, [("work", work.run)], spawn) for s, name in zip(stores, "ab", strict=True))
    ta = asyncio.create_task(a.run())
    await async_wait_for(lambda: a.held, 2, "a holds the lease")
    tb = asyncio.create_task(b.run())
    await asyncio.sleep(LEASE_S)  # b tries several times meanwhile
    assert (a.held, b.held, work.running) == (True, False, 1)
    # a dies (its task ends without releasing, as under SIGKILL): b takes over within the lease
    ta.cancel()
    await asyncio.wait([ta])
    for t in a._running:
        t.cancel()
    await asyncio.sleep(0)
    t0 = asyncio.get_running_loop().time()
    await async_wait_for(lambda: b.held, 5, "b takes the lease over")
    assert asyncio.get_running_loop().time() - t0 <= LEASE_S
    await async_wait_for(lambda: work.running == 1 and work.started == 2, 2, "the work runs again, once")
    await b.close()
    assert work.running == 0
    tb.cancel()
    await asyncio.wait([tb])
    for s in stores:
        await s.close()


async def test_a_holder_that_cannot_renew_stops_before_its_lease_expires(tmp_path: Path) -> None:
    store = open_sqlite(tmp_path / "store.sqlite3")
    work = Work()
    holder = LeaseHolder(store, "a", LEASE_S, [("work", work.run)], spawn)
    task = asyncio.create_task(holder.run())
    await async_wait_for(lambda: work.running == 1, 2, "the work runs")
    real = store.take_lease

    async def unreachable(name: str, who: str, now_ms: int, ttl_ms: int) -> bool:
        raise StoreError("the store is unreachable")

    store.take_lease = unreachable  # type: ignore[method-assign,assignment]
    await async_wait_for(lambda: work.running == 0, 2, "the work stopped")
    # Stopped before another instance could take the lease over: before the last renewal expires.
    assert work.stopped_ms < holder._renewed_ms + holder.ttl_ms
    store.take_lease = real  # type: ignore[method-assign]
    await async_wait_for(lambda: work.running == 1, 2, "back once the store is")
    task.cancel()
    await asyncio.wait([task])
    await holder.close()
    assert await store.take_lease(LEASE, "someone-else", 0, 1)  # released on close: free at once
    await store.close()


async def test_a_renewal_the_store_does_not_answer_stops_the_work_in_time(tmp_path: Path) -> None:
    # A hung connection or a saturated pool: the try itself never returns. The work must still stop before
    # the lease can expire, not whenever the store answers.
    store = open_sqlite(tmp_path / "store.sqlite3")
    work = Work()
    holder = LeaseHolder(store, "a", LEASE_S, [("work", work.run)], spawn)
    task = asyncio.create_task(holder.run())
    await async_wait_for(lambda: work.running == 1, 2, "the work runs")

    async def hangs(name: str, who: str, now_ms: int, ttl_ms: int) -> bool:
        await asyncio.Event().wait()
        return True

    store.take_lease = hangs  # type: ignore[method-assign,assignment]
    await async_wait_for(lambda: work.running == 0, 2, "the work stopped")
    assert work.stopped_ms < holder._renewed_ms + holder.ttl_ms  # before the last renewal expires
    task.cancel()
    await asyncio.wait([task])
    await holder.close()
    await store.close()


async def test_two_gateways_with_one_instance_name_never_both_hold_the_lease(tmp_path: Path) -> None:
    stores = [open_sqlite(tmp_path / "store.sqlite3") for _ in range(2)]
    work = Work()
    a, b = (LeaseHolder(s, "gw1", LEASE_S, [("work", work.run)], spawn) for s in stores)
    tasks = [asyncio.create_task(h.run()) for h in (a, b)]
    await async_wait_for(lambda: a.held or b.held, 2, "one holds the lease")
    await asyncio.sleep(LEASE_S)
    assert (a.held + b.held, work.running) == (1, 1)
    for t in tasks:
        t.cancel()
    await asyncio.wait(tasks)
    for h in (a, b):
        await h.close()
    for s in stores:
        await s.close()
