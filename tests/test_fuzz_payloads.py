"""Fuzzing car messages through the real broker: nothing crashes, nothing valid is lost, everything is counted.

Hypothesis draws a fixed, derandomized batch of messages (so CI time is
bounded and a failure reproduces): contract-shaped objects whose fields have
the right or the wrong type and range, odd ``ts`` values (both forms, far
future and past, floats, garbage), random bytes, non-UTF-8, NaN/Infinity
literals, huge integers, payloads around and over the 16 KiB cap, deeply
nested JSON up to 10,000 levels, and topics with odd vehicle ids (unicode,
empty, too long, lower case, unknown) or odd levels. An independent MQTT
client (paho) publishes them into the real Mosquitto; one gateway runs
in-process. Then:

* the gateway is still connected (on its first connection) and healthy;
* every published message is accounted: ``received`` is what was published
  and ``received == accepted + rejected``;
* every message the contract calls valid was accepted and every one it
  calls invalid was rejected (a few are drawn whose outcome the contract
  leaves open, e.g. nesting deeper than the parser's limit);
* InfluxDB holds one ``rejected`` row per rejection, and nothing was dropped.

Each message's expected outcome comes from how it was drawn (a field drawn
from a "bad" strategy makes the message invalid), not from the gateway's code.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from gateway.app import init_app
from tests.conftest import Stack, Unique
from tests.helpers import Parts, async_wait_for, both_links_up, gateway_settings, influx_query
from tests.payload_strategies import CAP, FLEET, N_MESSAGES, Expect, draw_batch

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# ---- publishing ------------------------------------------------------------------------------


def publish_blocking(port: int, batch: list[tuple[str, bytes, int]], timeout: float = 60.0) -> int:
    """Publish with paho (its own client, driven by hand in this thread) until the broker has every message."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"fuzz-{uuid.uuid4().hex[:8]}")
    client.max_inflight_messages_set(200)
    state = {"connected": False, "lost": None}

    def on_connect(c: Any, u: Any, flags: Any, rc: Any, props: Any = None) -> None:
        state["connected"] = not rc.is_failure

    def on_disconnect(c: Any, u: Any, flags: Any, rc: Any, props: Any = None) -> None:
        state["lost"] = rc

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.connect("127.0.0.1", port, keepalive=60)
    deadline = time.monotonic() + timeout

    def pump(until: Callable[[], bool], what: str) -> None:
        while not until():
            if state["lost"] is not None:
                raise AssertionError(f"the broker dropped the fuzz publisher ({state['lost']}) while {what}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out {what}")
            client.loop(0.05)

    pump(lambda: bool(state["connected"]), "connecting")
    infos = []
    for topic, payload, qos in batch:
        infos.append(client.publish(topic, payload, qos=qos))
        client.loop(0)
    pump(lambda: all(i.is_published() for i in infos), "waiting for the broker to take every message")
    client.disconnect()
    return len(infos)


# ---- the test --------------------------------------------------------------------------------


async def test_fuzzed_messages_never_stop_ingest_and_are_all_accounted(
    stack: Stack, unique: Unique, tmp_path: Path, aiohttp_client: Callable[..., Any]
) -> None:
    import asyncio

    batch = draw_batch(N_MESSAGES)
    assert len(batch) == N_MESSAGES
    url = f"http://127.0.0.1:{stack.influx.port}"
    settings_ = gateway_settings(stack.broker.port, url, unique.prefix, unique.database, tmp_path)
    client = await aiohttp_client(init_app(settings_, FLEET))
    rt = Parts(client.app)
    await async_wait_for(lambda: both_links_up(rt), what="gateway connected to the broker")

    now_ms = int(time.time() * 1000)
    # Messages whose outcome the contract fixes go first and are counted exactly; the open ones follow.
    wire: dict[bool, list[tuple[str, bytes, int]]] = {True: [], False: []}
    expected: Counter[Expect] = Counter()
    for m in batch:
        payload = m.render(now_ms)
        topic = unique.prefix if m.suffix is None else f"{unique.prefix}/{m.suffix}"
        verdict = m.expect(payload)
        wire[verdict != "either"].append((topic, payload, m.qos))
        expected[verdict] += 1
    # The batch really is the mix the docstring promises.
    every = wire[True] + wire[False]
    assert expected["accept"] > 300 and expected["reject"] > 600, expected
    assert sum(len(p) > CAP for _, p, _ in every) > 20
    assert any(b"[" * 10_000 in p for _, p, _ in every)

    stats = rt.ingest.stats
    published = 0
    for determinate in (True, False):
        published += await asyncio.to_thread(publish_blocking, stack.broker.port, wire[determinate])
        await async_wait_for(
            lambda target=published: stats.received >= target,  # type: ignore[misc]
            what=f"{published} messages received",
        )
        await async_wait_for(lambda: rt.journal.pending_points == 0, what="every point handed to InfluxDB")
        if determinate:
            # Nothing valid dropped, nothing invalid let through.
            assert (stats.accepted, stats.rejected) == (expected["accept"], expected["reject"]), (expected, stats)
    assert published == N_MESSAGES

    assert rt.link.connected and rt.link.connects == 1, "the gateway lost its broker connection"
    r = await client.get("/healthz")
    assert r.status == 200, await r.text()
    assert stats.received == published
    assert stats.received == stats.accepted + stats.rejected
    assert sum(stats.rejected_by.values()) == stats.rejected
    assert "internal_error" not in {reason for reason, _ in stats.rejected_by}, stats.rejected_by

    def rejected_rows() -> int:
        rows = influx_query(stack.influx.port, unique.database, 'SELECT count("topic") FROM rejected')
        return int(rows[0]["count"]) if rows else 0

    await async_wait_for(lambda: rejected_rows() == stats.rejected, what=f"{stats.rejected} rejected rows")
    assert rt.writer.stats.points_dropped == 0
