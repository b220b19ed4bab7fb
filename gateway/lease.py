"""The work that must happen once across gateway instances, done by whichever holds the lease.

Start-time unlocks, automatic ends, the scheduled alert checks and webhook
delivery must not run in two gateways sharing one store: a car would get
two unlocks, a receiver two deliveries. Pruning the store is here too,
since every instance deleting the same rows is wasted load. Every instance
tries to take one lease in the store; the holder runs those jobs and renews
the lease, the others keep trying. A holder that dies stops renewing, and another takes
over within ``ha.lease_s``: the lease is written for two thirds of it and
tried every sixth, so the worst case is 5/6 of ``lease_s``. A holder that
cannot renew (the store is unreachable, or slow to answer: each try is cut
off at the time the jobs must stop) stops its jobs a renewal period before
its lease can have expired. The expiry is written and compared on the
gateways' own clocks, so they must agree within that period (a sixth of
``lease_s``, 1.7 s by default): keep them synchronised (NTP).

On a shared store each process holds the lease under a name of its own (its
``instance`` and a random suffix), so two gateways left with the same
``instance`` still never both hold it; a restarted one waits for its old
lease to expire (at most two thirds of ``lease_s``) unless it stopped
cleanly, which gives the lease up.

On SQLite there is one gateway per file, which always gets the lease.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from gateway.errors import StoreError
from gateway.store.base import Store
from gateway.times import now_ms

log = logging.getLogger(__name__)

Job = tuple[str, Callable[[], Coroutine[Any, Any, None]]]
"""A name (for the log) and what starts it afresh: a job is started again after every lease regained."""

Spawn = Callable[[Coroutine[Any, Any, None], str], "asyncio.Task[None]"]

LEASE = "once-only-work"


class LeaseHolder:
    def __init__(
        self,
        store: Store,
        name: str,
        lease_s: float,
        jobs: list[Job],
        spawn: Spawn,
        clock: Callable[[], int] = now_ms,
        unique: bool = True,
    ) -> None:
        self.store = store
        self.spawn = spawn  # the app's supervisor: a job that dies shows in /healthz
        self.name = name  # for the log: the instance
        # Not unique on SQLite: one gateway per file, and a restart after a crash need not wait for its lease.
        self.holder = f"{name}/{uuid.uuid4().hex[:12]}" if unique else name
        self.jobs = jobs
        self.ttl_ms = int(lease_s * 1000 * 2 / 3)
        self.every_s = lease_s / 6
        self.clock = clock
        self.held = False
        self._running: list[asyncio.Task[None]] = []
        self._renewed_ms = 0  # on our clock, when the store last confirmed the lease

    async def run(self) -> None:
        while True:
            now = self.clock()
            # Ours until it expires: the jobs stop a renewal period before it can, whatever the store does
            # meanwhile, so a try that has not answered by then counts as failed.
            stop_ms = self._renewed_ms + self.ttl_ms - self.every_s * 1000
            wait_s = max(0.0, (stop_ms - now) / 1000) if self.held else self.every_s
            try:
                async with asyncio.timeout(wait_s):
                    got = await self.store.take_lease(LEASE, self.holder, now, self.ttl_ms)
            except (StoreError, TimeoutError) as e:
                log.error("lease: cannot renew (%s)", str(e) or f"no answer from the store within {wait_s:.1f} s")
                got = self.held and self.clock() < stop_ms
            else:
                if got:
                    self._renewed_ms = now
            if got and not self.held:
                self.held = True
                log.info("lease taken by %s: it runs %s", self.name, ", ".join(n for n, _ in self.jobs))
                self._running = [self.spawn(start(), name) for name, start in self.jobs]
            elif not got and self.held:
                log.warning("lease lost by %s: its once-only work stops (another instance takes it)", self.name)
                await self._stop()
            await asyncio.sleep(self.every_s)

    async def _stop(self) -> None:
        self.held = False
        running, self._running = self._running, []
        for t in running:
            t.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    async def close(self) -> None:
        """Stop the jobs and give the lease up, so another instance need not wait for it to expire."""
        was_held = self.held
        await self._stop()
        if was_held:
            try:
                await self.store.release_lease(LEASE, self.holder)
            except StoreError as e:
                log.warning("lease: cannot release (%s); it expires by itself", e)
