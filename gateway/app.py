"""The app factory: every resource opened in a cleanup context, closed in reverse order.

Start-up order: journal and writer (so anything left from a crash is
replayed first), then the MQTT link (messages start flowing into the
journal), then the start-time unlocks, then housekeeping (the self-report
and saving the latest state of the cars). Shutdown runs the other way: stop taking
messages, seal and acknowledge what is open, drain the journal to InfluxDB
within a deadline, close the sink. What does not drain stays in the journal
for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from gateway.booking.dispatcher import CommandDispatcher
from gateway.booking.service import Booking
from gateway.fleet import Fleet
from gateway.http.middleware import auth_middleware, errors_middleware
from gateway.http.ratelimit import RateLimiter
from gateway.ingest.journal import Journal
from gateway.ingest.pipeline import Ingest
from gateway.ingest.sinks import Sink, make_sink
from gateway.ingest.state import FleetState
from gateway.ingest.telemetry import Limits
from gateway.ingest.writer import Writer
from gateway.metrics import Snapshot, self_report_line
from gateway.mqtt.link import MqttLink
from gateway.settings import Settings
from gateway.store.sqlite import Store

log = logging.getLogger(__name__)

SELF_REPORT_INTERVAL_S = 10.0
STATE_FILE = "vehicles.json"
DRAIN_DEADLINE_S = 10.0


@dataclass
class Runtime:
    """Everything a request handler may need, built once per app."""

    settings: Settings
    fleet: Fleet
    state: FleetState
    journal: Journal
    writer: Writer
    link: MqttLink  # telemetry
    command_link: MqttLink  # commands out, acks in
    ingest: Ingest
    commands: CommandDispatcher
    booking: Booking
    limiter: RateLimiter
    dead_tasks: dict[str, str] = field(default_factory=dict)  # background tasks that stopped on an error

    def snapshot(self) -> Snapshot:
        return Snapshot(
            ingest=self.ingest.stats,
            writer=self.writer.stats,
            journal=self.journal,
            broker_connected=self.link.connected and self.command_link.connected,
            broker_connects=self.link.connects,
            vehicles_reporting=self.state.reporting_count(),
            vehicles_online=self.state.online_count(),
            commands=dict(self.commands.results),
            unmatched_acks=self.commands.unmatched_acks,
            dead_tasks=dict(self.dead_tasks),
        )


RUNTIME = web.AppKey("runtime", Runtime)


def build_runtime(settings: Settings, fleet: Fleet, sink: Sink) -> Runtime:
    j = settings.journal
    journal = Journal(
        settings.state.dir / "journal",
        batch_size=j.batch_size,
        flush_interval_s=j.flush_interval_s,
        max_bytes=j.max_bytes,
        memory_bytes=j.memory_bytes,
        fsync=j.fsync,
    )
    writer = Writer(journal, sink)
    state = FleetState(fleet)
    state.load(settings.state.dir / STATE_FILE)
    prefix = settings.mqtt.topic_prefix
    limits = Limits(
        max_payload_bytes=settings.ingest.max_payload_bytes,
        max_age_ms=int(settings.ingest.max_age_s * 1000),
        max_future_ms=int(settings.ingest.max_future_s * 1000),
    )
    # The links need ingest's callbacks and ingest needs the dispatcher, which needs a link.
    holder: list[Ingest] = []
    link = MqttLink(settings.mqtt, lambda msg, token: holder[0].handle(msg, token), [f"{prefix}/#"])
    # Commands and acks have a connection of their own: an ack must not wait behind a backlog of
    # unacknowledged telemetry (after a restart, or while the journal is full). Every instance sees
    # every ack (no shared subscription), since only the sender waits for it.
    command_settings = settings.mqtt.model_copy(
        update={"client_id": f"{settings.mqtt.client_id}-cmd", "session_expiry_s": 0}
    )
    command_link = MqttLink(
        command_settings,
        lambda msg, token: holder[0].handle_ack(msg, token),
        [f"{prefix}/+/commands/ack"],
        auto_ack=True,
        shared=False,
    )
    master = settings.commands.master_key.get_secret_value() if settings.commands.master_key else ""
    commands = CommandDispatcher(
        command_link, journal, master, prefix, settings.commands.ack_timeout_s, settings.commands.qos
    )
    ingest = Ingest(fleet, state, journal, prefix, limits, commands.on_ack)
    holder.append(ingest)
    journal.set_ack(link.ack)
    store = Store(settings.state.dir / "gateway.sqlite3")
    booking = Booking(store, fleet, commands, journal, settings.commands.early_grace_s)
    limiter = RateLimiter(settings.api.rate_limit_per_min)
    return Runtime(settings, fleet, state, journal, writer, link, command_link, ingest, commands, booking, limiter)


def _spawn(rt: Runtime, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    """A background task whose death is logged at once and shown in /healthz, not found at shutdown."""
    task = asyncio.create_task(coro, name=name)

    def done(t: asyncio.Task[None]) -> None:
        if not t.cancelled() and (exc := t.exception()) is not None:
            log.error("background task %s stopped: %r", name, exc, exc_info=exc)
            rt.dead_tasks[name] = repr(exc)[:200]

    task.add_done_callback(done)
    return task


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    # A task that died was logged when it did; shutdown goes on regardless.
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


async def storage_ctx(app: web.Application) -> AsyncIterator[None]:
    rt = app[RUNTIME]
    writer_task = _spawn(rt, rt.writer.run(), "influx-writer")
    sealer_task = _spawn(rt, rt.journal.run_sealer(), "journal-sealer")
    yield
    await _cancel(sealer_task)
    await _cancel(writer_task)
    drained = await rt.writer.drain(DRAIN_DEADLINE_S)
    if not drained:
        log.warning(
            "shutdown: %d batch(es) not yet in InfluxDB stay in the journal for the next start",
            len(rt.journal.segments),
        )
    await rt.writer.sink.close()


async def mqtt_ctx(app: web.Application) -> AsyncIterator[None]:
    rt = app[RUNTIME]
    tasks = [_spawn(rt, rt.link.run(), "mqtt-link"), _spawn(rt, rt.command_link.run(), "mqtt-command-link")]
    yield
    for task in tasks:
        await _cancel(task)
    # Seal and acknowledge what is open before saying goodbye to the broker.
    rt.journal.seal()
    await rt.link.close()
    await rt.command_link.close()


async def booking_ctx(app: web.Application) -> AsyncIterator[None]:
    rt = app[RUNTIME]
    task = _spawn(rt, rt.booking.run_start_unlocks(), "start-unlocks")
    yield
    await _cancel(task)
    await rt.booking.close()
    rt.booking.store.close()


async def housekeeping_ctx(app: web.Application) -> AsyncIterator[None]:
    rt = app[RUNTIME]

    state_file = rt.settings.state.dir / STATE_FILE

    async def report() -> None:
        while True:
            await asyncio.sleep(SELF_REPORT_INTERVAL_S)
            rt.journal.append(self_report_line(rt.snapshot(), rt.settings.instance, int(time.time() * 1000)))
            save_state()

    def save_state() -> None:
        try:
            rt.state.save(state_file)
        except OSError as e:
            log.warning("cannot save the vehicle state to %s: %s", state_file, e)

    task = _spawn(rt, report(), "self-report")
    yield
    await _cancel(task)
    save_state()


def init_app(settings: Settings, fleet: Fleet, sink: Sink | None = None) -> web.Application:
    from gateway.http.routes import setup_routes

    app = web.Application(
        middlewares=[errors_middleware, auth_middleware(tuple(k.get_secret_value() for k in settings.api.keys))],
        client_max_size=settings.http.max_body_bytes,
    )
    app[RUNTIME] = build_runtime(settings, fleet, sink or make_sink(settings.influx))
    app.cleanup_ctx.extend([storage_ctx, mqtt_ctx, booking_ctx, housekeeping_ctx])
    setup_routes(app)
    return app
