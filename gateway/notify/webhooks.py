"""Webhook deliveries from the durable outbox in the store.

Every event recorded with targets has one pending delivery per endpoint in
the store, in the same transaction as the event (``Store.add_event`` and
friends), so an event recorded before a crash is delivered after it with
the same ``webhook-id``. Each endpoint has its own loop and at most
``webhooks.per_endpoint`` attempts under way: an endpoint that never
answers holds its own slots for ``webhooks.timeout_s`` each and nothing
else — ingest, unlocks and the other endpoints go on. What each answer
means (retry when, give up, 410) is decided by ``gateway/rules/webhooks.py``.

Two things keep the store's work off the hot paths. Outcomes are written
behind, many in one transaction (:data:`OUTCOME_FLUSH_S`); until its outcome
is stored, and the endpoint's loop has started a read since, a delivery stays
"in flight" in memory, so it is never sent twice meanwhile, and a store that
refuses writes holds it there instead of letting it be sent again in a loop.
And a command's event wakes its endpoints a moment later
(:data:`WAKE_DELAY_S`), so a burst of commands is looked up once, after the
store has written their events in one batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiohttp

from gateway.errors import StoreError
from gateway.rules.events import Event
from gateway.rules.webhooks import LAST_TRY_SLACK_MS, Attempt, Delivery, headers, judge, too_old
from gateway.store.base import Store
from gateway.times import iso_ms, now_ms

__all__ = ["Deliverer", "Endpoint"]

log = logging.getLogger(__name__)

BACKLOG_EVERY_S = 5.0
EXPIRE_EVERY_S = 10.0
STORE_RETRY_S = 1.0
OUTCOME_FLUSH_S = 0.05
WAKE_DELAY_S = 0.06  # a little over the store's write-behind of command events (AUDIT_FLUSH_S)
MAX_RESPONSE_BYTES = 64 * 1024  # a receiver's answer is read (so the connection can be reused) up to this


@dataclass(frozen=True)
class Endpoint:
    url: str
    key: bytes  # the secret's decoded bytes
    types: tuple[str, ...]


class Deliverer:
    def __init__(
        self,
        store: Store,
        endpoints: Sequence[Endpoint],
        first_retry_s: float,
        max_age_s: float,
        timeout_s: float,
        per_endpoint: int,
        clock: Callable[[], int] = now_ms,
        rng: random.Random | None = None,
        on_gone: Callable[[str], None] = lambda url: None,
        poll_s: float | None = None,
    ) -> None:
        self.store = store
        # With other gateways on the store, events they record wake nobody here: look at least this often.
        self.poll_s = poll_s
        self.endpoints = list(endpoints)
        self.first_retry_s = first_retry_s
        self.max_age_s = max_age_s
        self.timeout_s = timeout_s
        self.per_endpoint = per_endpoint
        self.clock = clock
        self.rng = rng or random.Random()
        self.on_gone = on_gone  # stops new events being queued for an endpoint that answered 410
        self.results: Counter[str] = Counter()  # delivered, retry, expired, gone
        self.disabled: dict[str, str] = {}  # url -> why, for /healthz
        self.backlog = 0
        self._wakes = {e.url: asyncio.Event() for e in self.endpoints}
        self._wake_soon: set[tuple[str, bool]] = set()  # (url, delayed) wakes already on their way
        self._in_flight: dict[str, set[str]] = {e.url: set() for e in self.endpoints}  # see _serve
        self._stored: dict[str, list[str]] = {e.url: [] for e in self.endpoints}  # stored, still in flight
        self._outcomes: list[Attempt] = []
        self._outcomes_ready = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    def on_event(self, e: Event) -> None:
        """An event was recorded: wake the loops of the endpoints it goes to.

        A command's event is written behind (with the audit, see ``Store.record_command``): its
        endpoints are woken a moment later, once for a burst, when the batch is in the store. Any
        other event wakes them now."""
        delayed = e.type == "command.completed"
        for url in e.targets:
            if url in self._wakes and (url, delayed) not in self._wake_soon:
                self._wake_soon.add((url, delayed))
                asyncio.get_running_loop().call_later(WAKE_DELAY_S if delayed else 0.0, self._wake, url, delayed)

    def _wake(self, url: str, delayed: bool) -> None:
        self._wake_soon.discard((url, delayed))
        self._wakes[url].set()

    async def run(self) -> None:
        # Run again after a lease regained: what was in flight when it stopped is pending again in the store.
        self._in_flight = {e.url: set() for e in self.endpoints}
        self._stored = {e.url: [] for e in self.endpoints}
        self._outcomes = []
        urls = [e.url for e in self.endpoints]
        while True:
            try:
                dropped = await self.store.give_up_deliveries(
                    None, urls, "dropped", self.clock(), "endpoint no longer configured"
                )
                break
            except StoreError as e:
                log.error("webhooks: %s; trying again", e)
                await asyncio.sleep(STORE_RETRY_S)
        if dropped:
            log.warning("webhooks: %d pending deliveries to endpoints no longer configured were dropped", dropped)
        if not urls:
            return
        log.info("webhooks: delivering to %s", ", ".join(urls))
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        connector = aiohttp.TCPConnector(limit=self.per_endpoint * len(self.endpoints))
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            loops = [asyncio.create_task(self._serve(session, e), name=f"webhook {e.url}") for e in self.endpoints]
            loops.append(asyncio.create_task(self._count_backlog(), name="webhook backlog"))
            loops.append(asyncio.create_task(self._write_outcomes(), name="webhook outcomes"))
            try:
                await asyncio.gather(*loops)
            finally:
                for t in [*loops, *self._tasks]:
                    t.cancel()
                # An attempt cut short, or whose outcome was not yet stored, stays pending: it is made
                # again at the next start (at least once).
                await asyncio.gather(*loops, *self._tasks, return_exceptions=True)
                with contextlib.suppress(StoreError):
                    await self.store.record_attempts(self._outcomes)

    async def _count_backlog(self) -> None:
        while True:
            with contextlib.suppress(StoreError):
                self.backlog = await self.store.webhook_backlog()
            await asyncio.sleep(BACKLOG_EVERY_S)

    async def _serve(self, session: aiohttp.ClientSession, ep: Endpoint) -> None:
        wake = self._wakes[ep.url]
        slots = asyncio.Semaphore(self.per_endpoint)
        in_flight, stored = self._in_flight[ep.url], self._stored[ep.url]
        expired_at = 0  # when the outbox was last cleared of what is too old for this endpoint
        while ep.url not in self.disabled:
            await asyncio.sleep(0)  # the store's calls do not yield: a long backlog must not hold the loop
            wake.clear()
            # Out of flight only here, before a read: a read already under way when an outcome was stored
            # (on PostgreSQL, another connection) may still return its row as due, and must find it in flight.
            in_flight.difference_update(stored)
            stored.clear()
            now = self.clock()
            try:
                if now - expired_at >= EXPIRE_EVERY_S * 1000:
                    # In one statement, not one by one: after a long outage these can be thousands.
                    n = await self.store.expire_deliveries(
                        ep.url, now - int(self.max_age_s * 1000) - LAST_TRY_SLACK_MS, now
                    )
                    expired_at = now
                    if n:
                        self.results["expired"] += n
                        log.warning("webhooks: %d deliveries to %s given up untried: older than max_age_s", n, ep.url)
                due = await self.store.due_deliveries(ep.url, now, 2 * self.per_endpoint + len(in_flight))
                due = [d for d in due if d.event_id not in in_flight]
                # Fewer than were asked for: nothing else is due now, so sleep until the next one is.
                nxt = None if due else await self.store.next_delivery_ms(ep.url, now)
            except StoreError as e:
                log.error("webhooks: %s; trying again", e)
                await asyncio.sleep(STORE_RETRY_S)
                continue
            for d in due:
                if too_old(d.event_ms, now, self.max_age_s):
                    in_flight.add(d.event_id)
                    self._outcome(Attempt(d.event_id, ep.url, d.attempts, "expired", now, now, "older than max_age_s"))
                    self.results["expired"] += 1
                    continue
                await slots.acquire()
                if ep.url in self.disabled:
                    slots.release()
                    return
                in_flight.add(d.event_id)
                task = asyncio.create_task(self._attempt(session, ep, d, slots))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            if due:
                continue
            # Due rows all in flight: their outcomes wake us. Otherwise sleep until the next is due.
            wait = None if nxt is None else max(0.0, (nxt - self.clock()) / 1000)
            if self.poll_s is not None:
                wait = self.poll_s if wait is None else min(wait, self.poll_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), wait)

    async def _attempt(
        self, session: aiohttp.ClientSession, ep: Endpoint, d: Delivery, slots: asyncio.Semaphore
    ) -> None:
        try:
            status, retry_after, why = await self._post(session, ep, d)
        finally:
            slots.release()
        attempts = d.attempts + 1
        now = self.clock()
        try:
            v = judge(status, retry_after, attempts, d.event_ms, now, self.first_retry_s, self.max_age_s, self.rng)
        except Exception:  # whatever the receiver sent: the delivery must leave "in flight" with an outcome
            log.exception("webhook %s to %s: cannot judge the answer; retrying", d.event_id, ep.url)
            v = judge(None, None, attempts, d.event_ms, now, self.first_retry_s, self.max_age_s, self.rng)
        self.results[v.kind] += 1
        if v.kind == "retry" and v.next_ms is not None:
            self._outcome(Attempt(d.event_id, ep.url, attempts, "pending", v.next_ms, now, why))
            log.info("webhook %s to %s: %s; retry %d at %s", d.event_id, ep.url, why, attempts, iso_ms(v.next_ms))
        elif v.kind == "delivered":
            self._outcome(Attempt(d.event_id, ep.url, attempts, "delivered", d.due_ms, now))
        elif v.kind == "gone":
            self._outcome(Attempt(d.event_id, ep.url, attempts, "gone", d.due_ms, now, why))
            self._disable(ep.url, now)
        else:
            self._outcome(Attempt(d.event_id, ep.url, attempts, "expired", d.due_ms, now, why))
            log.warning(
                "webhook %s to %s given up after %d attempts (%s): the event is webhooks.max_age_s old",
                d.event_id, ep.url, attempts, why,
            )  # fmt: skip

    def _disable(self, url: str, now: int) -> None:
        if url in self.disabled:
            return
        self.disabled[url] = f"answered 410 Gone at {iso_ms(now)}; restart the gateway to enable it again"
        self.on_gone(url)
        log.error("webhooks: %s answered 410 Gone: endpoint disabled until the gateway restarts", url)
        self._wakes[url].set()  # its loop ends

        async def give_up() -> None:
            while True:
                try:
                    n = await self.store.give_up_deliveries(url, (), "gone", self.clock(), "endpoint answered 410")
                    break
                except StoreError as e:
                    log.error("webhooks: %s; trying again", e)
                    await asyncio.sleep(STORE_RETRY_S)
            if n:
                log.warning("webhooks: %d deliveries owed to %s given up (410); GET /v1/events has them", n, url)

        task = asyncio.create_task(give_up())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _outcome(self, a: Attempt) -> None:
        self._outcomes.append(a)
        self._outcomes_ready.set()

    async def _write_outcomes(self) -> None:
        while True:
            await self._outcomes_ready.wait()
            await asyncio.sleep(OUTCOME_FLUSH_S)  # gather what ends meanwhile into one transaction
            self._outcomes_ready.clear()
            batch = self._outcomes[:]  # left in the list until stored: shutdown writes what is still there
            while True:
                try:
                    await self.store.record_attempts(batch)
                    break
                except StoreError as e:
                    # Held in flight meanwhile: not sent again until its outcome is stored.
                    log.error("webhooks: %s; %d outcomes kept, trying again", e, len(batch))
                    await asyncio.sleep(STORE_RETRY_S)
            del self._outcomes[: len(batch)]
            for a in batch:
                self._stored[a.endpoint].append(a.event_id)
                self._wakes[a.endpoint].set()

    async def _post(
        self, session: aiohttp.ClientSession, ep: Endpoint, d: Delivery
    ) -> tuple[int | None, str | None, str]:
        """One POST: (status or None if no answer, Retry-After, what went wrong)."""
        hdrs = headers(ep.key, d.event_id, self.clock() // 1000, d.body)
        try:
            async with session.post(ep.url, data=d.body, headers=hdrs, allow_redirects=False) as resp:
                await resp.content.read(MAX_RESPONSE_BYTES)
                return resp.status, resp.headers.get("Retry-After"), f"HTTP {resp.status}"
        except TimeoutError:
            return None, None, f"no answer within {self.timeout_s:g} s"
        except (aiohttp.ClientError, OSError, ValueError) as e:
            return None, None, f"{type(e).__name__}: {e}"[:200]
