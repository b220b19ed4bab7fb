"""The start-time unlock: each ``unlock_at_start`` reservation is unlocked once, at its start.

A start that passed while the gateway was down is unlocked at the next
start. A claim is written to the store before the command is sent, so two
schedulers never send the same unlock. A claim left by a crash (sent, but
the outcome never recorded) is sent again once it is older than its sender
could still be waiting for the car's ack: unlocking twice is harmless and
not opening for a waiting user is not, but a younger claim may belong to a
sender still at work, here or on the gateway that held the lease before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from gateway.booking.service import Booking
from gateway.errors import BrokerUnavailable, StoreError
from gateway.rules.reservations import Reservation, StartUnlock
from gateway.store.base import Store
from gateway.times import now_ms

log = logging.getLogger(__name__)

__all__ = ["StartUnlocks"]


# An unlock that could not be sent (the broker was down) is tried again this often.
RETRY_S = 1.0
IDLE_S = 5.0
# A claim is abandoned this long after its sender's ack timeout: time for the sender's store write.
STALE_MARGIN_S = 5.0
# The caller of a start unlock whose reservation predates named keys: not a possible key name.
UNKNOWN_CALLER = "(before the audit)"


class StartUnlocks:
    def __init__(
        self, store: Store, booking: Booking, ack_timeout_s: float, clock: Callable[[], int] = now_ms,
        idle_s: float = IDLE_S,
    ) -> None:  # fmt: skip
        self.store = store
        self.booking = booking
        self.clock = clock
        # A pending claim older than this has no sender left waiting for its ack (see the module docstring).
        self.stale_after_ms = int((ack_timeout_s + STALE_MARGIN_S) * 1000)
        # A reservation booked through another gateway on the store wakes nobody here: the longest wait.
        self.idle_s = idle_s
        self._wake = asyncio.Event()
        self._tasks: dict[str, asyncio.Task[None]] = {}  # by reservation id: the unlocks under way here
        # Reservations whose unlock found the broker down: audited once per outage, not every retry.
        self._unsent: set[str] = set()

    def wake(self) -> None:
        """A reservation changed: look again now instead of at the next tick."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                await self._release_abandoned()
                await self._start_due()
                nxt = await self.store.next_start_unlock_ms(self.clock())
            except StoreError as e:
                log.error("start unlocks: %s; trying again", e)
                nxt = self.clock()
            now = self.clock()
            idle = self.idle_s
            wait = idle if nxt is None else min(idle, max(RETRY_S if nxt <= now else 0.01, (nxt - now) / 1000))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    async def _release_abandoned(self) -> None:
        # Every pass, not only at start: the sender may have died on another gateway, leaving the lease.
        now = self.clock()
        for r in await self.store.pending_start_unlocks():
            su = r.start_unlock
            if su is None or now - su.at_ms < self.stale_after_ms or r.id in self._tasks:
                continue
            log.warning("start unlock of %s was claimed %d s ago and never finished (a gateway stopped or "
                        "died meanwhile); sending it again", r.id, (now - su.at_ms) // 1000)  # fmt: skip
            await self.store.set_start_unlock(r.id, None)

    async def _start_due(self) -> None:
        for r in await self.store.due_start_unlocks(self.clock()):
            if await self.store.claim_start_unlock(r.id, StartUnlock("pending", self.clock())):
                task = asyncio.create_task(self._unlock(r), name=f"start-unlock-{r.id}")
                self._tasks[r.id] = task
                task.add_done_callback(self._done)

    async def _unlock(self, r: Reservation) -> None:
        caller = r.created_by or UNKNOWN_CALLER
        try:
            try:
                o = await self.booking.send_command(
                    r.vehicle_id, "unlock", r, caller, "start_unlock", audit_not_sent=r.id not in self._unsent
                )
            except BrokerUnavailable:
                # Not sent: release the claim so the scheduler tries again while the reservation runs.
                self._unsent.add(r.id)
                await self.store.set_start_unlock(r.id, None)
                asyncio.get_running_loop().call_later(RETRY_S, self.wake)
                return
            self._unsent.discard(r.id)
            su = StartUnlock(o.result, self.clock(), o.command_id, o.reason)
            await self.store.set_start_unlock(r.id, su)
        except StoreError as e:
            # The claim stays "pending" and is sent again once abandoned.
            log.error("start unlock of %s: %s", r.id, e)
            return
        log.info("start unlock of reservation %s on %s: %s", r.id, r.vehicle_id, su.status)

    def _done(self, task: asyncio.Task[None]) -> None:
        rid = task.get_name().removeprefix("start-unlock-")
        if self._tasks.get(rid) is task:
            del self._tasks[rid]

    async def close(self) -> None:
        """Cancel start unlocks still waiting for a car; their claims are sent again once abandoned."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
