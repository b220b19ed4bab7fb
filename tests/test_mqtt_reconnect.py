"""Reconnecting without a hot loop, against the real Mosquitto (part of issue 14).

Two clients with one client id take the session over from each other: the
broker accepts each (CONNACK) and drops the other at once. A client that
resets its back-off on CONNACK reconnects at once, forever — thousands of
connections a second between two instances left with the default id.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.mqtt import codec
from gateway.mqtt.link import MqttLink
from gateway.settings import MqttSettings
from tests.conftest import Broker, Unique
from tests.helpers import async_wait_for

pytestmark = pytest.mark.integration


async def test_two_links_sharing_a_client_id_back_off_instead_of_looping(any_broker: Broker, unique: Unique) -> None:
    settings = MqttSettings.model_validate(
        any_broker.mqtt(
            client_id=f"twin-{unique.database}", reconnect_min_s=0.2, reconnect_max_s=2.0, session_expiry_s=0
        )
    )
    links = [MqttLink(settings, lambda m, t: None, [f"{unique.prefix}/#"], auto_ack=True) for _ in range(2)]
    tasks = [asyncio.create_task(link.run()) for link in links]
    t0 = time.monotonic()
    try:
        await asyncio.sleep(4.0)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for link in links:
            await link.close()
    elapsed = time.monotonic() - t0
    connects = sum(link.connects for link in links)
    # With back-off from 0.2 s doubling to 2 s, each link connects about log2(10) + 2 times in 4 s; resetting
    # the back-off on every CONNACK made it thousands.
    assert 2 <= connects <= 30, f"{connects} connections in {elapsed:.1f} s"


async def test_a_stopped_link_ends_at_once_even_while_backing_off(any_broker: Broker, unique: Unique) -> None:
    settings = MqttSettings.model_validate(
        any_broker.mqtt(
            client_id=f"twin2-{unique.database}", reconnect_min_s=5.0, reconnect_max_s=30.0, session_expiry_s=0
        )
    )
    links = [MqttLink(settings, lambda m, t: None, [f"{unique.prefix}/#"], auto_ack=True) for _ in range(2)]
    tasks = [asyncio.create_task(link.run()) for link in links]
    await asyncio.sleep(1.0)  # both have kicked each other off and wait out their back-off
    for t in tasks:
        t.cancel()
    _, pending = await asyncio.wait(tasks, timeout=2.0)
    for link in links:
        await link.close()
    assert not pending, "a link did not stop while reconnecting"


@pytest.mark.parametrize("hops", [0, 1, 2, 3])
async def test_a_stop_arriving_as_the_connection_drops_is_not_swallowed(
    any_broker: Broker, unique: Unique, hops: int
) -> None:
    # The cancellation is timed by the event loop itself, `hops` callbacks after the connection's loss, so
    # every step of the link's clean-up after a loss is hit; a stop that landed while it waited for its
    # keepalive task used to be swallowed with that task's own, and the link reconnected instead of ending.
    settings = MqttSettings.model_validate(
        any_broker.mqtt(client_id=f"stop-{hops}-{unique.database}", reconnect_min_s=0.05, reconnect_max_s=0.1,
                        session_expiry_s=0)
    )  # fmt: skip
    link = MqttLink(settings, lambda m, t: None, [f"{unique.prefix}/#"], auto_ack=True)
    task = asyncio.create_task(link.run())
    loop = asyncio.get_running_loop()
    await async_wait_for(lambda: link.connected, 10, "connected")
    assert link._proto is not None

    def cancel_after(n: int) -> None:
        if n:
            loop.call_soon(cancel_after, n - 1)
        else:
            task.cancel()

    link._proto.lost.add_done_callback(lambda _: loop.call_soon(cancel_after, hops))
    # Another client with our id: the broker closes our connection, as it does to one of two twins.
    _reader, writer = await asyncio.open_connection("127.0.0.1", any_broker.port)
    writer.write(codec.connect(settings.client_id or "", 30, False, 0, 10, any_broker.username, any_broker.password))
    try:
        done, _ = await asyncio.wait([task], timeout=2.0)
        assert done, f"the link went on after being stopped (connects: {link.connects})"
        assert task.cancelled()
    finally:
        writer.close()
        task.cancel()
        await asyncio.wait([task])
        await link.close()
