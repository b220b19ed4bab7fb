"""Webhook deliveries against real HTTP receivers: signatures, retries, Retry-After, 410, slow endpoints, a crash.

Events come from the alert rules (a car moving with no trip opens
``moved_without_trip`` at once), published through the real broker. Each
receiver (``device_sim.receiver``) checks every signature with its own
implementation and answers as each test scripts it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from device_sim.receiver import Answer, Delivery, Receiver
from gateway.errors import StoreError
from gateway.notify.events import EventLog
from gateway.notify.webhooks import Deliverer, Endpoint
from gateway.rules.webhooks import decode_secret
from gateway.store.sqlite import open_sqlite
from scripts.services import free_port
from tests.conftest import Stack, Unique
from tests.helpers import AUTH, async_wait_for, mosquitto_pub, wait_for
from tests.processes import GatewayProcess
from tests.test_alerts_integration import AWAY, Env, start

pytestmark = pytest.mark.integration

SECRET = "whsec_" + base64.b64encode(b"webhook-integration-test-secret!!").decode()
OTHER = "whsec_" + base64.b64encode(b"another-endpoint-with-its-secret!").decode()
CARS = ["ZOE-001", "ZOE-002", "ZOE-003", "ZOE-005", "ZOE-006"]


def scripted(*answers: Answer) -> Callable[[Delivery], Answer]:
    """Each event id gets `answers` in turn, then 200s."""
    seen: Counter[str] = Counter()

    def plan(d: Delivery) -> Answer:
        n = seen[d.id]
        seen[d.id] += 1
        return answers[n] if n < len(answers) else Answer()

    return plan


async def gateway(
    stack: Stack, unique: Unique, tmp_path: Path, aiohttp_client: Callable[..., Any], *receivers: Receiver, **over: Any
) -> Env:
    endpoints = [{"url": r.url, "secret": r.secret} for r in receivers]
    env = await start(stack, unique, tmp_path, aiohttp_client, webhooks__endpoints=endpoints, **over)
    await env.receiver.stop()  # start()'s own receiver is not wanted here
    return env


async def move(env: Env, vehicle: str) -> None:
    await env.at(vehicle, AWAY, speed=40)


def metric(env: Env, text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def metrics(env: Env) -> str:
    r = await env.client.get("/metrics")
    return await r.text()


async def test_every_delivery_is_signed_and_a_500_is_retried_with_growing_delays(
    stack: Stack, unique: Unique, tmp_path: Path, aiohttp_client: Callable[..., Any]
) -> None:
    rx = await Receiver(SECRET, plan=scripted(Answer(500), Answer(500))).start()
    env = await gateway(stack, unique, tmp_path, aiohttp_client, rx)
    try:
        await move(env, "ZOE-001")
        [d] = await rx.wait(lambda r: r.accepted("alert.opened"), what="the alert delivered")
        tries = [x for x in rx.deliveries if x.id == d.id]
        assert [x.status for x in tries] == [500, 500, 200]
        assert rx.refused == []
        first, second = tries[1].received_s - tries[0].received_s, tries[2].received_s - tries[1].received_s
        # About 0.2 s, then about 0.4 s, each ±20%: bounds apart, so that a stalled loop does not read as no growth.
        assert first > 0.1 and second > 0.3, (first, second)
        assert d.event["id"].startswith("evt_") and d.event["type"] == "alert.opened"
        text = await metrics(env)
        assert 'gateway_webhook_deliveries_total{result="retry"} 2.0' in text
        assert 'gateway_webhook_deliveries_total{result="delivered"} 1.0' in text
    finally:
        await rx.stop()


async def test_no_answer_in_time_is_retried(
    stack: Stack, unique: Unique, tmp_path: Path, aiohttp_client: Callable[..., Any]
) -> None:
    rx = await Receiver(SECRET, plan=scripted(Answer(200, delay_s=2.0))).start()
    env = await gateway(stack, unique, tmp_path, aiohttp_client, rx, webhooks__timeout_s=0.5)
    try:
        await move(env, "ZOE-002")
        # The first attempt is answered too late (the receiver logs it after its delay): the gateway
        # has given up on it and tried again.
        await rx.wait(lambda r: max(r.attempts().values(), default=0) >= 2, what="a second attempt")
        assert len(rx.accepted("alert.opened")) == 1
        assert 'gateway_webhook_deliveries_total{result="retry"} 1.0' in await metrics(env)
    finally:
        await rx.stop()


async def test_retry_after_on_429_is_honoured(
    stack: Stack, unique: Unique, tmp_path: Path, aiohttp_client: Callable[..., Any]
) -> None:
    rx = await Receiver(SECRET, plan=scripted(Answer(429, retry_after="1"))).start()
    env = await gateway(stack, unique, tmp_path, aiohttp_client, rx, webhooks__first_retry_s=0.05)
    try:
        await move(env, "ZOE-003")
        [d] = await rx.wait(lambda r: r.accepted("alert.opened"), what="the alert delivered")
        tries = [x for x in rx.deliveries if x.id == d.id]
        assert [x.status for x in tries] == [429, 200]
        assert tries[1].received_s - tries[0].received_s >= 0.95  # not the 0.05 s back-off
    finally:
        await rx.stop()


async def test_410_disables_that_endpoint_only(
    stack: Stack, unique: Unique, tmp_path: Path, aiohttp_client: Callable[..., Any]
) -> None:
    gone = await Receiver(SECRET, plan=lambda d: Answer(410)).start()
    fine = await Receiver(OTHER).start()
    env = await gateway(stack, unique, tmp_path, aiohttp_client, gone, fine)
    try:
        await move(env, "ZOE-001")
        await fine.wait(lambda r: r.accepted("alert.opened"), what="the first alert at the working endpoint")
        await gone.wait(lambda r: r.deliveries, what="the 410")
        r = await env.client.get("/healthz")
        health = await r.json()
        assert r.status == 503 and "webhooks" in health["degraded"] and gone.url in health["degraded"]["webhooks"]
        await move(env, "ZOE-002")
        await fine.wait(lambda r: len(r.accepted("alert.opened")) == 2, what="the second alert")
        await asyncio.sleep(0.5)
        assert len(gone.deliveries) == 1
        assert 'gateway_webhook_deliveries_total{result="gone"} 1.0' in await metrics(env)
        assert gone.url not in env.rt.events.endpoints  # nothing new is queued for it
        assert await env.rt.store.webhook_backlog() == 0  # and what it was owed is given up
    finally:
        await gone.stop()
        await fine.stop()


async def test_an_endpoint_that_never_answers_slows_no_other(
    stack: Stack, unique: Unique, tmp_path: Path, aiohttp_client: Callable[..., Any]
) -> None:
    dead = await Receiver(SECRET, plan=lambda d: Answer(200, delay_s=30)).start()
    live = await Receiver(OTHER).start()
    env = await gateway(stack, unique, tmp_path, aiohttp_client, dead, live, webhooks__per_endpoint=2)
    try:
        for vid in CARS:
            await move(env, vid)
        await live.wait(lambda r: len(r.accepted("alert.opened")) == len(CARS), what="every alert at the live one")
        for _ in range(50):  # the live one's outcomes are written within 50 ms
            if await env.rt.store.webhook_backlog() == len(CARS):
                break
            await asyncio.sleep(0.05)
        assert await env.rt.store.webhook_backlog() == len(CARS)  # all still owed to the dead one
        assert dead.deliveries == []  # none answered yet
        # The API does not wait for it either.
        r = await env.client.get("/v1/alerts", headers=AUTH)
        assert r.status == 200 and len((await r.json())["alerts"]) == len(CARS)
    finally:
        await live.stop()
        await dead.stop()


async def test_types_choose_what_an_endpoint_gets(
    stack: Stack, unique: Unique, tmp_path: Path, aiohttp_client: Callable[..., Any]
) -> None:
    everything = await Receiver(SECRET).start()
    resolutions = await Receiver(OTHER).start()
    env = await start(
        stack, unique, tmp_path, aiohttp_client,
        webhooks__endpoints=[
            {"url": everything.url, "secret": SECRET, "types": ["*"]},
            {"url": resolutions.url, "secret": OTHER, "types": ["alert.resolved"]},
        ],
    )  # fmt: skip
    await env.receiver.stop()
    try:
        await move(env, "ZOE-001")
        await env.at("ZOE-001", (48.4318, 0.0949))
        await resolutions.wait(lambda r: r.accepted(), what="the resolution")
        await everything.wait(lambda r: len(r.accepted()) == 2, what="both at the catch-all endpoint")
        await asyncio.sleep(0.3)
        assert [d.type for d in resolutions.accepted()] == ["alert.resolved"]
    finally:
        await everything.stop()
        await resolutions.stop()


async def test_an_event_too_old_is_given_up(
    stack: Stack, unique: Unique, tmp_path: Path, aiohttp_client: Callable[..., Any]
) -> None:
    rx = await Receiver(SECRET, plan=lambda d: Answer(500)).start()
    env = await gateway(stack, unique, tmp_path, aiohttp_client, rx, webhooks__max_age_s=1)
    try:
        await move(env, "ZOE-001")
        await async_wait_for(lambda: env.rt.deliverer.results["expired"] == 1, what="given up")

        async def backlog() -> int:
            return int(await env.rt.store.webhook_backlog())

        for _ in range(50):
            if await backlog() == 0:
                break
            await asyncio.sleep(0.05)
        assert await backlog() == 0
        # At once, about 0.2 s later, about 0.4 s after that (unless a slow start left no room for it), and a
        # last one when the event is 1 s old; none after.
        made_ms = int(datetime.fromisoformat(rx.deliveries[0].event["timestamp"]).timestamp() * 1000)
        ages = [d.received_s - made_ms / 1000 for d in rx.deliveries]
        assert 3 <= len(ages) <= 4, ages
        assert 0.99 <= ages[-1] < 2.0, ages
    finally:
        await rx.stop()


# -- a crash with deliveries owed ----------------------------------------------------------------------------


def _get(port: int, path: str) -> Any:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=AUTH)
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.load(r)


async def test_events_recorded_before_a_sigkill_are_delivered_after_it_with_the_same_id(
    stack: Stack, unique: Unique, tmp_path: Path
) -> None:
    port = free_port()  # nothing listens there yet: every attempt fails
    url = f"http://127.0.0.1:{port}/hook"
    gw = GatewayProcess(
        tmp_path, stack.broker.port, stack.influx.port, unique.prefix, unique.database,
        GATEWAY__WEBHOOKS__ENDPOINTS=json.dumps([{"url": url, "secret": SECRET}]),
        GATEWAY__WEBHOOKS__FIRST_RETRY_S="0.3",
        GATEWAY__ALERTS__SILENT_AFTER_S="3600",
        GATEWAY__ALERTS__CHECK_EVERY_S="0.2",
        GATEWAY__DEV_MODE="true",
    )  # fmt: skip
    gw.start()
    rx = Receiver(SECRET)
    try:
        wait_for(lambda: (gw.health() or {}).get("broker") == "connected", what="gateway connected")
        for vid in CARS:
            await mosquitto_pub(stack.broker.port, f"{unique.prefix}/{vid}/location",
                                json.dumps({"lat": AWAY[0], "lon": AWAY[1], "speed_kmh": 40}))  # fmt: skip
        events = wait_for(
            lambda: (ev := _get(gw.http_port, "/v1/events")["events"]) and len(ev) == len(CARS) and ev,
            what="every event recorded",
        )
        owed = {e["id"] for e in events}
        await asyncio.sleep(0.5)  # a few failed attempts each
        gw.kill()
        await rx.start(port)
        gw.start()
        await rx.wait(lambda r: len(r.accepted()) >= len(CARS), timeout=20, what="every event after the restart")
        assert {d.id for d in rx.accepted()} == owed
        assert all(d.event["id"] == d.id for d in rx.deliveries)
        assert rx.refused == []
        # Through health(), which reads a 503 too: a link still reconnecting after the restart is not the point here.
        wait_for(lambda: (gw.health() or {}).get("webhooks", {}).get("backlog") == 0, timeout=15, what="no backlog")
    finally:
        gw.stop()
        await rx.stop()


# -- the deliverer on its own, against the real SQLite store and a real receiver --------------------------


class RefusingWrites:
    """The real store, refusing to record outcomes for a while (a full disk)."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.refuse = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def record_attempts(self, attempts: Any) -> None:
        if self.refuse:
            raise StoreError("the disk is full")
        await self.store.record_attempts(attempts)


async def test_an_outcome_the_store_refuses_is_held_not_sent_again(tmp_path: Path) -> None:
    rx = await Receiver(SECRET).start()
    store = open_sqlite(tmp_path / "s.sqlite3")
    refusing = RefusingWrites(store)
    d = Deliverer(refusing, [Endpoint(rx.url, decode_secret(SECRET), ("*",))], 0.05, 3600, 2, 4)
    e = EventLog({rx.url: ("*",)}).new("alert.opened", {"n": 1})
    await store.add_event(e)
    task = asyncio.create_task(d.run())
    try:
        await rx.wait(lambda r: r.deliveries, what="the first delivery")
        await asyncio.sleep(1.5)  # the outcome cannot be stored: it must not be sent again meanwhile
        assert len(rx.deliveries) == 1
        refusing.refuse = False
        for _ in range(60):
            if await store.webhook_backlog() == 0:
                break
            await asyncio.sleep(0.05)
        assert await store.webhook_backlog() == 0 and len(rx.deliveries) == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await rx.stop()
        await store.close()


class StaleReads:
    """The real store, whose reads of due deliveries come back only once an outcome has been stored, with
    the rows read before it: as on PostgreSQL, where the read runs on one connection while the outcome
    commits on another."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.stored = asyncio.Event()
        self.reads = 0
        self.straddled = 0  # reads that began before an outcome was stored and returned after it

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def record_attempts(self, attempts: Any) -> None:
        await self.store.record_attempts(attempts)
        self.stored.set()

    async def due_deliveries(self, endpoint: str, now_ms: int, limit: int) -> Any:
        rows = await self.store.due_deliveries(endpoint, now_ms, limit)
        self.reads += 1
        if self.reads > 1 and rows and not self.stored.is_set():  # the first read finds the event, at once
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stored.wait(), 5)
            self.straddled += self.stored.is_set()
        return rows


async def test_a_read_overlapping_an_outcome_being_stored_sends_nothing_twice(tmp_path: Path) -> None:
    rx = await Receiver(SECRET).start()
    store = open_sqlite(tmp_path / "s.sqlite3")
    stale = StaleReads(store)
    d = Deliverer(stale, [Endpoint(rx.url, decode_secret(SECRET), ("*",))], 0.05, 3600, 2, 4)
    e = EventLog({rx.url: ("*",)}).new("alert.opened", {"n": 1})
    await store.add_event(e)
    task = asyncio.create_task(d.run())
    try:
        await rx.wait(lambda r: r.accepted(), what="the delivery")
        await async_wait_for(lambda: stale.stored.is_set(), what="its outcome stored")
        await asyncio.sleep(0.5)  # the read from before the outcome has come back meanwhile
        assert stale.straddled >= 1  # there was such a read
        assert [x.id for x in rx.deliveries] == [e.id]  # and it did not send the event again
        assert await store.webhook_backlog() == 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await rx.stop()
        await store.close()


async def test_a_backlog_past_its_age_is_given_up_untried_and_the_rest_goes_out(tmp_path: Path) -> None:
    rx = await Receiver(SECRET).start()
    store = open_sqlite(tmp_path / "s.sqlite3")
    log = EventLog({rx.url: ("*",)})
    old = int(time.time() * 1000) - 3 * 86_400_000
    for i in range(2000):  # three days of a dead receiver's backlog
        await store.add_event(log.new("alert.opened", {"n": i}, old + i))
    fresh = log.new("alert.opened", {"n": "fresh"})
    await store.add_event(fresh)
    d = Deliverer(store, [Endpoint(rx.url, decode_secret(SECRET), ("*",))], 5, 86400, 15, 4)
    task = asyncio.create_task(d.run())
    try:
        await rx.wait(lambda r: r.accepted(), what="the fresh event")
        for _ in range(60):
            if await store.webhook_backlog() == 0:
                break
            await asyncio.sleep(0.05)
        assert [x.id for x in rx.deliveries] == [fresh.id]  # none of the 2,000 was tried
        assert d.results["expired"] == 2000 and await store.webhook_backlog() == 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await rx.stop()
        await store.close()
