"""Webhook deliveries from the durable outbox in the store.

Every event recorded with targets has one pending delivery per endpoint in
the store, in the same transaction as the event (``Store.add_event`` and
friends), so an event recorded before a crash is delivered after it with
the same ``webhook-id``. Each endpoint has its own loop and at most
``webhooks.per_endpoint`` attempts under way: an endpoint that never
answers holds its own slots for ``webhooks.timeout_s`` each and nothing
else — ingest, unlocks and the other endpoints go on. What each answer
means (retry when, give up, 410) is decided by ``gateway/rules/webhooks.py``.
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
from gateway.rules.webhooks import Delivery, headers, judge
from gateway.store.base import Store
from gateway.times import iso_ms, now_ms

__all__ = ["Deliverer", "Endpoint"]

log = logging.getLogger(__name__)

BACKLOG_EVERY_S = 5.0
STORE_RETRY_S = 1.0
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
    ) -> None:
        self.store = store
        self.endpoints = list(endpoints)
        self.first_retry_s = first_retry_s
        self.max_age_s = max_age_s
        self.timeout_s = timeout_s
        self.per_endpoint = per_endpoint
        self.clock = clock
        self.rng = rng or random.Random()
        self.results: Counter[str] = Counter()  # delivered, retry, expired, gone
        self.disabled: dict[str, str] = {}  # url -> why, for /healthz
        self.backlog = 0
        self._wakes = {e.url: asyncio.Event() for e in self.endpoints}
        self._tasks: set[asyncio.Task[None]] = set()

    def on_event(self, e: Event) -> None:
        """An event was recorded: wake the loops of the endpoints it goes to."""
        for url in e.targets:
            wake = self._wakes.get(url)
            if wake is not None:
                wake.set()

    async def run(self) -> None:
        if not self.endpoints:
            return
        urls = [e.url for e in self.endpoints]
        while True:
            try:
                dropped = await self.store.drop_deliveries(urls, self.clock())
                break
            except StoreError as e:
                log.error("webhooks: %s; trying again", e)
                await asyncio.sleep(STORE_RETRY_S)
        if dropped:
            log.warning("webhooks: %d pending deliveries to endpoints no longer configured were dropped", dropped)
        log.info("webhooks: delivering to %s", ", ".join(urls))
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        connector = aiohttp.TCPConnector(limit=self.per_endpoint * len(self.endpoints))
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            loops = [asyncio.create_task(self._serve(session, e), name=f"webhook {e.url}") for e in self.endpoints]
            loops.append(asyncio.create_task(self._count_backlog(), name="webhook backlog"))
            try:
                await asyncio.gather(*loops)
            finally:
                for t in [*loops, *self._tasks]:
                    t.cancel()
                # An attempt cut short stays pending in the store: it is made again at the next start.
                await asyncio.gather(*loops, *self._tasks, return_exceptions=True)

    async def _count_backlog(self) -> None:
        while True:
            with contextlib.suppress(StoreError):
                self.backlog = await self.store.webhook_backlog()
            await asyncio.sleep(BACKLOG_EVERY_S)

    async def _serve(self, session: aiohttp.ClientSession, ep: Endpoint) -> None:
        wake = self._wakes[ep.url]
        slots = asyncio.Semaphore(self.per_endpoint)
        in_flight: set[str] = set()
        while ep.url not in self.disabled:
            wake.clear()
            now = self.clock()
            try:
                due = await self.store.due_deliveries(ep.url, now, 2 * self.per_endpoint)
                due = [d for d in due if d.event_id not in in_flight]
                if not due:
                    nxt = await self.store.next_delivery_ms(ep.url)
            except StoreError as e:
                log.error("webhooks: %s; trying again", e)
                await asyncio.sleep(STORE_RETRY_S)
                continue
            for d in due:
                await slots.acquire()
                if ep.url in self.disabled:
                    slots.release()
                    return
                in_flight.add(d.event_id)
                task = asyncio.create_task(self._attempt(session, ep, d, slots, in_flight))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            if due:
                continue
            # Due rows all in flight: their end wakes us. Otherwise sleep until the next is due.
            wait = None if nxt is None or nxt <= now else (nxt - now) / 1000
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), wait)

    async def _attempt(
        self, session: aiohttp.ClientSession, ep: Endpoint, d: Delivery, slots: asyncio.Semaphore, in_flight: set[str]
    ) -> None:
        try:
            status, retry_after, why = await self._post(session, ep, d)
            attempts = d.attempts + 1
            now = self.clock()
            v = judge(status, retry_after, attempts, d.event_ms, now, self.first_retry_s, self.max_age_s, self.rng)
            self.results[v.kind] += 1
            try:
                if v.kind == "retry" and v.next_ms is not None:
                    await self.store.retry_delivery(d, attempts, v.next_ms, why or v.why)
                    log.info(
                        "webhook %s to %s: %s; retry %d at %s", d.event_id, ep.url, why or v.why, attempts,
                        iso_ms(v.next_ms),
                    )  # fmt: skip
                elif v.kind == "delivered":
                    await self.store.finish_delivery(d, "delivered", attempts, now, "")
                elif v.kind == "gone":
                    await self.store.finish_delivery(d, "gone", attempts, now, why or v.why)
                else:
                    await self.store.finish_delivery(d, "expired", attempts, now, why or v.why)
            except StoreError as e:
                # The attempt's outcome is lost, not the event: it stays pending and is sent again.
                log.error("webhook %s to %s: %s", d.event_id, ep.url, e)
            if v.kind == "gone":
                self.disabled[ep.url] = f"answered 410 Gone at {iso_ms(now)}; restart the gateway to enable it again"
                log.error("webhooks: %s answered 410 Gone: endpoint disabled until the gateway restarts", ep.url)
            elif v.kind == "expired":
                log.warning(
                    "webhook %s to %s given up after %d attempts (%s): older than webhooks.max_age_s",
                    d.event_id, ep.url, attempts, why or v.why,
                )  # fmt: skip
        finally:
            in_flight.discard(d.event_id)
            slots.release()
            self._wakes[ep.url].set()

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
