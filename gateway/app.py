"""The app factory: every resource opened in its own cleanup context, closed in reverse order.

Start-up order, each step a context below:

1. the journal (anything left from a crash is replayed first) — a state
   directory that cannot be written stops start-up here;
2. the InfluxDB sink, with its HTTP client session, checked reachable;
3. the writer and the journal's sealer;
4. the store (SQLite, or PostgreSQL with ``store.url``) — a corrupt or unreadable
   file, or a database that cannot be reached, stops start-up here;
5. the cars' latest state, restored from the last save;
6. the event log, the webhook deliveries and the alert monitor (its open alerts loaded);
7. the two MQTT links (telemetry; commands and acks) and ingest;
8. the alert checks, now that the broker's state can be watched;
9. the booking service and the start-time unlocks;
10. the lease (``gateway/lease.py``): whoever holds it runs the once-only work the
    steps above listed (webhook delivery, the scheduled alert checks, start-time
    unlocks, automatic ends) and pruning the store, so several gateways on one
    store never do it twice;
11. housekeeping: the self-report, saving the state.

Shutdown runs the other way: stop the schedulers, stop taking messages,
seal and acknowledge what is open, save the state, close the store, drain
the journal to InfluxDB within a deadline, close the sink. What does not
drain stays in the journal for the next start. A step that fails raises
:class:`~gateway.errors.StartupError`; aiohttp then closes the steps
already open, and ``python -m gateway`` prints one line and exits 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from gateway.booking.dispatcher import CommandDispatcher
from gateway.booking.rentals import Rentals, readings_from
from gateway.booking.service import Booking
from gateway.booking.start_unlocks import IDLE_S, StartUnlocks
from gateway.errors import StartupError, StoreError
from gateway.filelock import hold
from gateway.fleet import Fleet
from gateway.http.keys import BOOKING, FEED, FLEET, LIMITER, MONITOR, RENTALS, STATE
from gateway.http.middleware import auth_middleware, errors_middleware
from gateway.http.ratelimit import RateLimiter
from gateway.http.routes import setup_routes
from gateway.ingest.journal import Journal
from gateway.ingest.pipeline import Ingest
from gateway.ingest.sinks import Sink, make_sink
from gateway.ingest.state import FleetState
from gateway.ingest.state_sync import StateSync
from gateway.ingest.telemetry import KINDS, Limits
from gateway.ingest.writer import Writer
from gateway.lease import LeaseHolder
from gateway.metrics import Monitor, Snapshot, self_report_line
from gateway.mqtt.link import MqttLink
from gateway.notify.alerts import AlertMonitor
from gateway.notify.events import EventLog
from gateway.notify.feed import Feed
from gateway.notify.webhooks import Deliverer, Endpoint
from gateway.rules.alerts import Thresholds
from gateway.rules.billing import Tariff
from gateway.rules.webhooks import decode_secret
from gateway.settings import Settings
from gateway.store.base import Store
from gateway.store.postgres import open_postgres
from gateway.store.sqlite import open_sqlite
from gateway.times import now_ms

log = logging.getLogger(__name__)

__all__ = [
    "ALERTS",
    "COMMAND_LINK",
    "DELIVERER",
    "DISPATCHER",
    "EVENTS",
    "INGEST",
    "JOURNAL",
    "LINK",
    "SETTINGS",
    "SINK",
    "START_UNLOCKS",
    "STORE",
    "SUPERVISOR",
    "WRITER",
    "init_app",
]

SELF_REPORT_INTERVAL_S = 10.0
PRUNE_INTERVAL_S = 3600.0
LOCK_FILE = "gateway.lock"  # in state.dir: one gateway per state directory (gateway/filelock.py)
STATE_FILE = "vehicles.json"
ALERT_VIEWS_FILE = "alert-views.json"
DRAIN_DEADLINE_S = 10.0
ALERTS_DRAIN_S = 2.0
# With other gateways on the store, events and reservations they write wake nobody here: look this often.
SHARED_POLL_S = 1.0


@dataclass
class Supervisor:
    """Background tasks whose death is logged at once and shown in /healthz, not found at shutdown."""

    dead: dict[str, str] = field(default_factory=dict)

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)

        def done(t: asyncio.Task[None]) -> None:
            if not t.cancelled() and (exc := t.exception()) is not None:
                log.error("background task %s stopped: %r", name, exc, exc_info=exc)
                self.dead[name] = repr(exc)[:200]

        task.add_done_callback(done)
        return task

    @staticmethod
    async def cancel(task: asyncio.Task[None]) -> None:
        task.cancel()
        # A task that died was logged when it did; shutdown goes on regardless.
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


SETTINGS = web.AppKey("settings", Settings)
SUPERVISOR = web.AppKey("supervisor", Supervisor)
JOURNAL = web.AppKey("journal", Journal)
SINK = web.AppKey("sink", Sink)
WRITER = web.AppKey("writer", Writer)
STORE = web.AppKey("store", Store)
LINK = web.AppKey("link", MqttLink)  # telemetry in
COMMAND_LINK = web.AppKey("command_link", MqttLink)  # commands out, acks in
DISPATCHER = web.AppKey("dispatcher", CommandDispatcher)
INGEST = web.AppKey("ingest", Ingest)
START_UNLOCKS = web.AppKey("start_unlocks", StartUnlocks)
EVENTS = web.AppKey("events", EventLog)
DELIVERER = web.AppKey("deliverer", Deliverer)
ALERTS = web.AppKey("alerts", AlertMonitor)
ONCE_JOBS = web.AppKey("once_jobs", list)  # the work only the lease holder does (gateway/lease.py)
LEASE = web.AppKey("lease", LeaseHolder)


async def journal_ctx(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    j = s.journal
    directory = s.state.dir / "journal"
    try:
        s.state.dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StartupError(f"state.dir: cannot create {s.state.dir}: {e.strerror or e}") from e
    # Released as the last step of shutdown (this context is the first opened): another gateway may start.
    with hold(s.state.dir / LOCK_FILE, "state.dir", s.state.dir):
        try:
            app[JOURNAL] = Journal(
                directory,
                batch_size=j.batch_size,
                flush_interval_s=j.flush_interval_s,
                max_bytes=j.max_bytes,
                memory_bytes=j.memory_bytes,
                fsync=j.fsync,
                window=s.mqtt.receive_maximum,
            )
        except OSError as e:
            raise StartupError(f"state.dir: cannot use {directory}: {e.strerror or e}") from e
        yield


def sink_ctx(sink: Sink | None) -> Any:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        s = app[SETTINGS].influx
        app[SINK] = the_sink = sink or make_sink(s)
        try:
            await the_sink.check(s.start_timeout_s)
        except BaseException:
            await the_sink.close()
            raise
        yield
        await the_sink.close()

    return ctx


async def writer_ctx(app: web.Application) -> AsyncIterator[None]:
    sup, journal = app[SUPERVISOR], app[JOURNAL]
    app[WRITER] = writer = Writer(journal, app[SINK], observe=app[MONITOR].write_duration.observe)
    writer_task = sup.spawn(writer.run(), "influx-writer")
    sealer_task = sup.spawn(journal.run_sealer(), "journal-sealer")
    yield
    await sup.cancel(sealer_task)
    await sup.cancel(writer_task)
    if not await writer.drain(DRAIN_DEADLINE_S):
        log.warning(
            "shutdown: %d batch(es) not yet in InfluxDB stay in the journal for the next start", len(journal.segments)
        )


async def store_ctx(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    store: Store
    if (url := s.store.postgres_url) is not None:
        store = await open_postgres(url, s.store.pool_size)
    else:
        names = "store.url" if s.store.url is not None else "store"
        path = s.store.sqlite_file(s.state.dir)
        store = open_sqlite(path, names, exclusive=True)
        log.info("store: SQLite file %s", path.resolve())
    app[STORE] = store
    yield
    await store.close()


async def state_ctx(app: web.Application) -> AsyncIterator[None]:
    s, sup = app[SETTINGS], app[SUPERVISOR]
    path = s.state.dir / STATE_FILE
    app[STATE] = state = FleetState(app[FLEET])
    state.load(path)
    sync = None
    if s.store.shared:  # other gateways may share the store: share the cars' state through it
        sync = sup.spawn(StateSync(state, app[STORE], s.ha.state_sync_s).run(), "state-sync")
    yield
    if sync is not None:
        await sup.cancel(sync)
    try:
        state.save(path)
    except OSError as e:
        log.warning("cannot save the vehicle state to %s: %s", path, e)


async def notify_ctx(app: web.Application) -> AsyncIterator[None]:
    s, store = app[SETTINGS], app[STORE]
    w, a = s.webhooks, s.alerts
    endpoints = [Endpoint(e.url, decode_secret(e.secret.get_secret_value()), e.types) for e in w.endpoints]
    app[EVENTS] = events = EventLog({e.url: e.types for e in endpoints})
    app[DELIVERER] = deliverer = Deliverer(
        store, endpoints, w.first_retry_s, w.max_age_s, w.timeout_s, w.per_endpoint, on_gone=events.disable,
        poll_s=SHARED_POLL_S if s.store.shared else None,
    )  # fmt: skip
    events.listen(deliverer.on_event)
    thresholds = Thresholds(
        silent_after_ms=int(a.silent_after_s * 1000),
        battery_horizon_ms=int(a.battery_horizon_s * 1000),
        min_soc_at_start_pct=a.min_soc_at_start_pct,
        return_grace_ms=int(a.return_grace_s * 1000),
        unattended_after_ms=int(a.unattended_after_s * 1000),
        charging_fault_after_ms=int(a.charging_fault_after_s * 1000),
    )
    app[ALERTS] = alerts = AlertMonitor(
        store, app[FLEET], app[STATE], events, app[JOURNAL].append, thresholds, a.replay_after_s, a.check_every_s,
        views_file=s.state.dir / ALERT_VIEWS_FILE,
    )  # fmt: skip
    if a.enabled:
        try:
            await alerts.load()
        except StoreError as e:
            raise StartupError(f"store: cannot read the open alerts: {e}") from e
    app[FEED] = Feed(store, app[FLEET])
    app[ONCE_JOBS] = [("webhooks", deliverer.run)]
    yield


async def alerts_ctx(app: web.Application) -> AsyncIterator[None]:
    s, sup, alerts, link = app[SETTINGS], app[SUPERVISOR], app[ALERTS], app[LINK]
    if not s.alerts.enabled:
        log.info("alerts: off (alerts.enabled is false)")
        yield
        return
    app[INGEST].on_reading = alerts.observe
    writer = sup.spawn(alerts.run_writer(), "alerts-writer")
    app[ONCE_JOBS].append(("alerts-checks", lambda: alerts.run_checks(lambda: (link.connected, link.connects))))
    yield
    app[INGEST].on_reading = None  # the checks were stopped with the lease (lease_ctx, closed before this)
    await alerts.drain(ALERTS_DRAIN_S)
    await sup.cancel(writer)
    alerts.save()


async def mqtt_ctx(app: web.Application) -> AsyncIterator[None]:
    s, sup, journal = app[SETTINGS], app[SUPERVISOR], app[JOURNAL]
    prefix = s.mqtt.topic_prefix
    limits = Limits(
        max_payload_bytes=s.ingest.max_payload_bytes,
        max_age_ms=int(s.ingest.max_age_s * 1000),
        max_future_ms=int(s.ingest.max_future_s * 1000),
    )
    # Commands and acks have a connection of their own: an ack must not wait behind a backlog of
    # unacknowledged telemetry (after a restart, or while the journal is full). Every instance sees
    # every ack (no shared subscription), since only the sender waits for it.
    command_settings = s.mqtt.model_copy(
        update={"client_id": f"{s.mqtt.client_id or 'fleet-gateway'}-cmd", "session_expiry_s": 0}
    )
    command_link = MqttLink(
        command_settings,
        lambda msg, token: ingest.handle_ack(msg, token),
        [f"{prefix}/+/commands/ack"],
        auto_ack=True,
        shared=False,
    )
    master = s.commands.master_key.get_secret_value() if s.commands.master_key else ""
    dispatcher = CommandDispatcher(
        command_link,
        journal,
        master,
        prefix,
        s.commands.ack_timeout_s,
        s.commands.qos,
        observe=app[MONITOR].command_duration.observe,
    )
    ingest = Ingest(app[FLEET], app[STATE], journal, prefix, limits, dispatcher.on_ack)
    if s.mqtt.shared_group:
        # Brokers that follow the specification (EMQX, HiveMQ) send no retained message to a shared
        # subscription, so the cars' retained status and wills come on a subscription of every instance's own.
        shared = [f"{prefix}/+/{kind}" for kind in KINDS if kind != "status"]
        link = MqttLink(s.mqtt, ingest.handle, shared, unshared_filters=[f"{prefix}/+/status"])
    else:
        link = MqttLink(s.mqtt, ingest.handle, [f"{prefix}/#"])
    journal.set_ack(link.ack)
    app[LINK], app[COMMAND_LINK], app[DISPATCHER], app[INGEST] = link, command_link, dispatcher, ingest
    tasks = [sup.spawn(link.run(), "mqtt-link"), sup.spawn(command_link.run(), "mqtt-command-link")]
    yield
    for task in tasks:
        await sup.cancel(task)
    # Seal and acknowledge what is open before saying goodbye to the broker.
    journal.seal()
    await link.close()
    await command_link.close()


async def booking_ctx(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    booking = Booking(
        app[STORE], app[FLEET], app[DISPATCHER], app[JOURNAL].append, s.commands.early_grace_s, events=app[EVENTS],
        preempt_notice_s=s.booking.preempt_notice_s,
    )  # fmt: skip
    starts = StartUnlocks(
        app[STORE], booking, s.commands.ack_timeout_s, idle_s=SHARED_POLL_S if s.store.shared else IDLE_S
    )
    booking.on_change = starts.wake
    b, t = s.billing, s.trips
    rentals = Rentals(
        app[STORE],
        booking,
        app[FLEET],
        readings_from(app[STATE]),
        app[JOURNAL].append,
        Tariff(**b.model_dump()),
        t.end_checks,
        t.max_state_age_s,
        t.auto_end_after_s,
        events=app[EVENTS],
    )
    booking.on_unlocked = rentals.unlocked
    app[BOOKING], app[START_UNLOCKS], app[RENTALS] = booking, starts, rentals
    app[ONCE_JOBS] += [("start-unlocks", starts.run), ("auto-end", rentals.run_auto_end)]
    yield
    await starts.close()


async def prune_store(store: Store, event_retention_ms: int) -> None:
    """Every hour, drop what is past its retention: idempotency keys, audit records, events."""
    while True:
        try:
            now = now_ms()
            gone = await store.prune(now, now - event_retention_ms)
        except StoreError as e:
            log.error("pruning the store: %s", e)
        else:
            if gone:
                log.info("pruned %d idempotency keys, audit records and events past their retention", gone)
        await asyncio.sleep(PRUNE_INTERVAL_S)


async def lease_ctx(app: web.Application) -> AsyncIterator[None]:
    s, sup, store = app[SETTINGS], app[SUPERVISOR], app[STORE]
    # Pruning is once-only work too: harmless twice, but every gateway deleting the same rows is wasted load.
    retention_ms = int(s.events.retention_days * 86_400_000)
    app[ONCE_JOBS].append(("prune-store", lambda: prune_store(store, retention_ms)))
    app[LEASE] = holder = LeaseHolder(store, s.instance, s.ha.lease_s, app[ONCE_JOBS], sup.spawn, unique=s.store.shared)
    task = sup.spawn(holder.run(), "lease")
    yield
    await sup.cancel(task)
    await holder.close()


async def housekeeping_ctx(app: web.Application) -> AsyncIterator[None]:
    s, sup, journal, state = app[SETTINGS], app[SUPERVISOR], app[JOURNAL], app[STATE]
    state_file = s.state.dir / STATE_FILE
    link, command_link, dispatcher, ingest, writer, alerts, deliverer = (
        app[LINK], app[COMMAND_LINK], app[DISPATCHER], app[INGEST], app[WRITER], app[ALERTS], app[DELIVERER],
    )  # fmt: skip

    def snapshot() -> Snapshot:
        return Snapshot(
            ingest=ingest.stats,
            writer=writer.stats,
            journal=journal,
            broker_connected=link.connected and command_link.connected,
            broker_connects=link.connects,
            links={"telemetry": link.stats, "commands": command_link.stats},
            vehicles_reporting=state.reporting_count(),
            vehicles_online=state.online_count(),
            commands=dict(dispatcher.results),
            unmatched_acks=dispatcher.unmatched_acks,
            dead_tasks=dict(sup.dead),
            alerts_open=alerts.open_by_type(),
            webhook_results=dict(deliverer.results),
            webhook_backlog=deliverer.backlog,
            webhooks_disabled=dict(deliverer.disabled),
            reservations_displaced=dict(app[BOOKING].displaced),
            lease_held=app[LEASE].held,
        )

    app[MONITOR].watch(snapshot)

    async def report() -> None:
        while True:
            await asyncio.sleep(SELF_REPORT_INTERVAL_S)
            journal.append(self_report_line(snapshot(), s.instance, now_ms()))
            try:
                state.save(state_file)
            except OSError as e:
                log.warning("cannot save the vehicle state to %s: %s", state_file, e)
            if s.alerts.enabled:
                alerts.save()

    tasks = [sup.spawn(report(), "self-report")]
    yield
    for task in tasks:
        await sup.cancel(task)


def init_app(settings: Settings, fleet: Fleet, sink: Sink | None = None) -> web.Application:
    """The whole gateway as an aiohttp app; nothing is opened until it starts."""
    app = web.Application(
        middlewares=[errors_middleware, auth_middleware(settings.api.keys)],
        client_max_size=settings.http.max_body_bytes,
    )
    app[SETTINGS] = settings
    app[FLEET] = fleet
    app[SUPERVISOR] = Supervisor()
    app[MONITOR] = Monitor()
    app[LIMITER] = RateLimiter(settings.api.rate_limit_per_min)
    app.cleanup_ctx.extend(
        [
            journal_ctx,
            sink_ctx(sink),
            writer_ctx,
            store_ctx,
            state_ctx,
            notify_ctx,
            mqtt_ctx,
            alerts_ctx,
            booking_ctx,
            lease_ctx,
            housekeeping_ctx,
        ]
    )
    setup_routes(app)
    return app
