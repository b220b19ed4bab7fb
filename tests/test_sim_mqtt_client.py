"""The simulator's MQTT client (device_sim/mqtt.py) against a real Mosquitto, and against a fake broker for
what no compliant broker sends.

One Mosquitto of our own for the module, never the session's (tests here freeze it with SIGSTOP): a plain
listener, a TLS listener and a TLS listener that requires a client certificate (certificates from
config/mosquitto/make-certs.sh), and the dynamic-security plugin refusing subscriptions to ``denied/#``.
Mosquitto 2.0.11's acl_file cannot show a refused subscription: it grants every filter (SUBACK 0x01) and
silently withholds what the ACL does not allow, so the ACL that answers 0x80 is the plugin's.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from device_sim.mqtt import (
    MqttClient,
    MqttError,
    MqttProtocolError,
    MqttSubscribeError,
    encode_connect,
    encode_publish,
)
from device_sim.mqtt_codec import decode_packets
from scripts import services
from tests.helpers import REPO, async_wait_for
from tests.secure_broker import make_certs

pytestmark = pytest.mark.integration

DYNSEC_PLUGINS = sorted(glob.glob("/usr/lib/*/mosquitto_dynamic_security.so"))
DYNSEC_CONFIG = {  # anonymous clients may do anything but subscribe to denied/#
    "defaultACLAccess": {"publishClientSend": True, "publishClientReceive": True, "subscribe": True,
                         "unsubscribe": True},
    "clients": [],
    "groups": [{"groupname": "anonymous", "roles": [{"rolename": "no-denied"}]}],
    "roles": [{"rolename": "no-denied",
               "acls": [{"acltype": "subscribePattern", "topic": "denied/#", "priority": 0, "allow": False}]}],
    "anonymousGroup": "anonymous",
}  # fmt: skip


@dataclass
class Broker:
    service: services.Service
    tls_port: int
    mtls_port: int  # TLS with require_certificate
    certs: Path  # ca.crt, server.*, client.crt, client.key

    @property
    def port(self) -> int:
        return self.service.port

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """The broker stopped dead: its sockets stay open, the kernel still takes our bytes, nothing answers."""
        os.kill(self.service.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.service.pid, signal.SIGCONT)


def client_certificate(certs: Path) -> None:
    """client.crt and client.key, signed by the CA of make_certs (an EC key: quick to make)."""
    (certs / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for argv in (
        ["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", "/CN=ZOE-001",
         "-keyout", "client.key", "-out", "client.csr"],
        ["x509", "-req", "-in", "client.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1",
         "-extfile", "client.ext", "-out", "client.crt"],
    ):  # fmt: skip
        subprocess.run(["openssl", *argv], cwd=certs, check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    if not Path(services.MOSQUITTO).exists():
        pytest.skip("Debian's mosquitto is not installed (scripts/setup.sh installs it)")
    if not DYNSEC_PLUGINS:
        pytest.skip("Mosquitto's dynamic security plugin is not installed")
    base = tmp_path_factory.mktemp("sim-mqtt")
    certs = make_certs(base / "certs")
    client_certificate(certs)
    (base / "dynsec.json").write_text(json.dumps(DYNSEC_CONFIG))
    tls_port, mtls_port = services.free_port(), services.free_port()
    tls = f"cafile {certs}/ca.crt\ncertfile {certs}/server.crt\nkeyfile {certs}/server.key\n"
    extra = (
        f"plugin {DYNSEC_PLUGINS[0]}\nplugin_opt_config_file {base}/dynsec.json\n"
        f"listener {tls_port} 127.0.0.1\n{tls}"
        f"listener {mtls_port} 127.0.0.1\n{tls}require_certificate true\n"
    )
    service = services.start_mosquitto(base / "mosquitto", extra_conf=extra)
    b = Broker(service, tls_port, mtls_port, certs)
    try:
        deadline = time.monotonic() + 10
        while not (services.port_open(tls_port) and services.port_open(mtls_port)):
            assert time.monotonic() < deadline, "the TLS listeners did not open"
            time.sleep(0.05)
        yield b
    finally:
        os.kill(service.pid, signal.SIGCONT)  # in case a test died frozen
        service.stop()


class Inbox:
    def __init__(self) -> None:
        self.msgs: list[tuple[str, bytes]] = []

    def __call__(self, topic: str, payload: bytes) -> None:
        self.msgs.append((topic, payload))


def topic() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@contextlib.asynccontextmanager
async def connected(port: int, **kw: Any) -> AsyncIterator[MqttClient]:
    client = await MqttClient.connect("127.0.0.1", port, f"t-{uuid.uuid4().hex[:8]}", timeout=10, **kw)
    try:
        yield client
    finally:
        client.abort()


# ---- 1. a dead connection is noticed ---------------------------------------------------------------


async def test_a_frozen_broker_is_noticed_within_a_few_seconds_at_keepalive_2(broker: Broker) -> None:
    async with connected(broker.port, keepalive=2) as client:
        await client.subscribe([(topic(), 1)])  # a round trip: the link works
        with broker.frozen():
            t0 = time.monotonic()
            async with asyncio.timeout(9):  # at most 1.5 x keepalive after the last PINGREQ, plus a tick
                await client.closed
            waited = time.monotonic() - t0
        assert not client.is_connected
        assert isinstance(client.error, MqttError) and "no answer from the broker" in str(client.error)
        # Not before 1.5 x keepalive of silence; 3-4 s by construction, with room for a loaded machine's lag.
        assert 1.5 <= waited <= 7.5, waited
        with pytest.raises(MqttError):
            client.publish("x", b"", 1)


# ---- 2. QoS 2 -----------------------------------------------------------------------------------------


@dataclass
class FakeBroker:
    """A TCP server speaking just enough MQTT: CONNACK `connack` to CONNECT, `suback` to SUBSCRIBE (its
    packet id patched in) followed by `after_suback`. Records every packet the client sends."""

    connack: bytes = b"\x20\x02\x00\x00"
    suback: bytes = b"\x90\x03\x00\x00\x01"
    after_suback: bytes = b""
    received: list[tuple[int, bytes]] = field(default_factory=list)
    eof: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        buf = bytearray()
        while data := await r.read(65536):
            buf += data
            for head, body in decode_packets(buf):
                self.received.append((head, body))
                if head == 0x10:
                    w.write(self.connack)
                elif head == 0x82:
                    w.write(self.suback[:2] + body[:2] + self.suback[4:] + self.after_suback)
        self.eof.set()
        w.close()


@contextlib.asynccontextmanager
async def fake_broker(fake: FakeBroker) -> AsyncIterator[FakeBroker]:
    server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
    fake.port = server.sockets[0].getsockname()[1]
    try:
        yield fake
    finally:
        server.close()


async def test_a_qos2_publish_closes_the_connection_instead_of_getting_a_puback() -> None:
    qos2 = encode_publish("fleet/ZOE-001/commands", b"{}", 2, False, 9)
    async with fake_broker(FakeBroker(after_suback=qos2)) as fake:
        inbox = Inbox()
        client = await MqttClient.connect("127.0.0.1", fake.port, "c", on_message=inbox, timeout=5)
        await client.subscribe([("fleet/ZOE-001/commands", 1)])
        async with asyncio.timeout(5):
            await client.closed
            await fake.eof.wait()
    assert isinstance(client.error, MqttProtocolError) and "QoS 2" in str(client.error)
    assert [h for h, _ in fake.received] == [0x10, 0x82]  # no PUBACK, no PUBREC: nothing after SUBSCRIBE
    assert inbox.msgs == []


async def test_mosquitto_delivers_a_qos2_publish_at_the_qos1_we_subscribe_with(broker: Broker) -> None:
    t = topic()
    inbox = Inbox()
    async with connected(broker.port, on_message=inbox) as client:
        assert await client.subscribe([(t, 1)]) == b"\x01"
        with pytest.raises(ValueError, match="qos"):
            await client.subscribe([(t, 2)])
        # A QoS 2 publisher with the whole PUBREC / PUBREL / PUBCOMP exchange.
        r, w = await asyncio.open_connection("127.0.0.1", broker.port)
        w.write(encode_connect(f"q2-{uuid.uuid4().hex[:6]}", 30, True, None))
        assert await r.readexactly(4) == b"\x20\x02\x00\x00"
        w.write(encode_publish(t, b"exactly once", 2, False, 1))
        assert await r.readexactly(4) == b"\x50\x02\x00\x01"  # PUBREC
        w.write(b"\x62\x02\x00\x01")  # PUBREL
        assert await r.readexactly(4) == b"\x70\x02\x00\x01"  # PUBCOMP
        w.write(b"\xe0\x00")
        w.close()
        await async_wait_for(lambda: inbox.msgs, 5, "the QoS 2 message at QoS 1")
        assert inbox.msgs == [(t, b"exactly once")]
        assert client.is_connected


# ---- 3. TLS -----------------------------------------------------------------------------------------


async def test_tls_checks_the_broker_and_round_trips(broker: Broker) -> None:
    ca = broker.certs / "ca.crt"
    t = topic()
    inbox = Inbox()
    async with connected(broker.tls_port, ca_file=ca, on_message=inbox) as client:
        assert client.transport is not None and client.transport.get_extra_info("ssl_object") is not None
        await client.subscribe([(t, 1)])
        fut = client.publish(t, b"over tls", 1, track=True)
        assert fut is not None
        await asyncio.wait_for(fut, 5)
        await async_wait_for(lambda: inbox.msgs, 5, "the message back over TLS")
    with pytest.raises(MqttError, match="CERTIFICATE_VERIFY_FAILED"):  # the system's CAs do not know ours
        await MqttClient.connect("127.0.0.1", broker.tls_port, "c", tls=ssl.create_default_context(), timeout=5)
    with pytest.raises(MqttError, match="CERTIFICATE_VERIFY_FAILED"):  # not the name in its certificate
        await MqttClient.connect("127.0.0.1", broker.tls_port, "c", ca_file=ca, server_hostname="evil", timeout=5)


async def test_tls_presents_the_client_certificate_when_the_broker_requires_one(broker: Broker) -> None:
    c = broker.certs
    with pytest.raises(MqttError):
        await MqttClient.connect("127.0.0.1", broker.mtls_port, "c", ca_file=c / "ca.crt", timeout=5)
    async with connected(
        broker.mtls_port, ca_file=c / "ca.crt", cert_file=c / "client.crt", key_file=c / "client.key"
    ) as client:
        await client.subscribe([(topic(), 1)])


async def test_the_simulator_cli_runs_its_cars_over_tls(broker: Broker) -> None:
    prefix = f"{topic()}/fleet"
    inbox = Inbox()
    async with connected(broker.port, on_message=inbox) as observer:
        await observer.subscribe([(f"{prefix}/+/status", 1)])
        argv = [
            sys.executable,
            "-m",
            "device_sim",
            "--port",
            str(broker.tls_port),
            "--prefix",
            prefix,
            "--vehicles",
            "3",
            "--quiet",
            "--duration",
            "60",
            "--ca-file",
            str(broker.certs / "ca.crt"),
        ]
        proc = await asyncio.create_subprocess_exec(*argv, cwd=REPO, stderr=asyncio.subprocess.PIPE)

        def online() -> set[str]:
            return {t for t, p in inbox.msgs if b'"online":true' in p}

        try:
            await async_wait_for(lambda: len(online()) == 3 or proc.returncode is not None, 15, "cars online")
            assert proc.returncode is None, "the simulator exited"
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            _, err = await asyncio.wait_for(proc.communicate(), 15)
        assert proc.returncode == 0, err
        assert len(online()) == 3


# ---- 4. the incoming size limit ------------------------------------------------------------------------


async def test_a_packet_over_the_default_size_limit_closes_the_connection(broker: Broker) -> None:
    t = topic()
    inbox = Inbox()
    async with connected(broker.port, on_message=inbox) as car, connected(broker.port) as sender:
        await car.subscribe([(t, 0)])
        sender.publish(t, b"small", 0)
        await async_wait_for(lambda: inbox.msgs, 5, "the small message")
        sender.publish(t, b"x" * 300_000, 0)  # under Mosquitto's 1 MiB, over our 256 KiB
        async with asyncio.timeout(5):
            await car.closed
        assert isinstance(car.error, MqttProtocolError) and "over the limit of 262144 bytes" in str(car.error)
        assert inbox.msgs == [(t, b"small")]


# ---- 5. drain with many publishers ---------------------------------------------------------------------


async def test_many_publishers_waiting_on_a_paused_transport_all_resume(broker: Broker) -> None:
    payload = b"p" * 16384
    writers, rounds = 50, 20  # 16 MB: more than the kernel buffers of a frozen peer take
    acks: list[asyncio.Future[None]] = []
    waiting: set[int] = set()
    async with connected(broker.port) as client:

        async def publisher(i: int) -> None:
            for _ in range(rounds):
                await asyncio.sleep(0)  # the publishers take turns, as the cars do
                fut = client.publish(f"burst/{i}", payload, 1, track=True)
                assert fut is not None
                acks.append(fut)
                waiting.add(i)
                await client.drain()
                waiting.discard(i)

        with broker.frozen():
            tasks = [asyncio.create_task(publisher(i)) for i in range(writers)]
            await async_wait_for(lambda: client.paused and len(waiting) == writers, 10, "every publisher paused")
        async with asyncio.timeout(20):
            await asyncio.gather(*tasks)
            await asyncio.gather(*acks)
    assert len(acks) == writers * rounds and client.acked == writers * rounds


# ---- 6. refused subscriptions --------------------------------------------------------------------------


async def test_a_refused_subscription_raises_and_the_granted_ones_stay(broker: Broker) -> None:
    ok, denied = topic(), f"denied/{topic()}"
    inbox = Inbox()
    async with connected(broker.port, on_message=inbox) as client:
        with pytest.raises(MqttSubscribeError) as e:
            await client.subscribe([(ok, 1), (denied, 1)])
        assert e.value.refused == [denied] and e.value.codes == b"\x01\x80"
        assert client.is_connected
        client.publish(ok, b"still subscribed", 1)
        client.publish(denied, b"refused", 1)
        client.publish(ok, b"marker", 1)  # after the denied one: once it is here, the denied one would be too
        await async_wait_for(lambda: len(inbox.msgs) >= 2, 5, "the messages on the granted filter")
        assert inbox.msgs == [(ok, b"still subscribed"), (ok, b"marker")]


# ---- 7. short packets from the broker -------------------------------------------------------------------


async def test_a_short_connack_fails_connect_with_a_protocol_error() -> None:
    async with fake_broker(FakeBroker(connack=b"\x20\x01\x00")) as fake:
        with pytest.raises(MqttProtocolError, match="CONNACK"):
            await MqttClient.connect("127.0.0.1", fake.port, "c", timeout=5)


async def test_a_short_suback_fails_subscribe_with_a_protocol_error() -> None:
    async with fake_broker(FakeBroker(suback=b"\x90\x02\x00\x00")) as fake:  # a packet id, no return code
        client = await MqttClient.connect("127.0.0.1", fake.port, "c", timeout=5)
        with pytest.raises(MqttProtocolError, match="SUBACK"):
            await client.subscribe([("a", 1)], timeout=5)
        assert not client.is_connected
