"""The simulator's MQTT client (device_sim/mqtt.py) without a broker: its decoder fuzzed with hypothesis, its
answers to malformed, oversized and unexpected packets, its keepalive and drain, on a dummy transport."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_sim.cli import build_parser, tls_from_args
from device_sim.mqtt import (
    MAX_PACKET_SIZE,
    SILENT_TICKS,
    MqttClient,
    MqttError,
    MqttProtocolError,
    MqttSubscribeError,
    PacketDecoder,
    encode_publish,
    parse_publish,
    tls_context,
)
from device_sim.mqtt_codec import FIXED_HEADER_MAX, decode_packets
from gateway.errors import ConfigError

T = TypeVar("T")


class DummyTransport(asyncio.Transport):
    """Keeps what the client writes; abort() only notes it (tests call connection_lost when they need it)."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.aborted


@pytest.fixture(scope="module")
def run() -> Iterator[Callable[[Callable[[], T]], T]]:
    """Run a plain function inside an event loop (MqttClient needs one); one loop for the whole module."""
    with asyncio.Runner() as runner:

        def call(fn: Callable[[], T]) -> T:
            async def inside() -> T:
                return fn()

            return runner.run(inside())

        yield call


def client_on_dummy(
    on_message: Callable[[str, bytes], None] | None = None, **kw: Any
) -> tuple[MqttClient, DummyTransport]:
    client = MqttClient(on_message, **kw)
    transport = DummyTransport()
    client.connection_made(transport)
    return client, transport


def packet(head: int, body: bytes) -> bytes:
    n, length = len(body), bytearray()
    while True:
        n, byte = divmod(n, 128)
        length.append(byte | (0x80 if n else 0))
        if not n:
            return bytes([head]) + bytes(length) + body


def pieces(data: bytes, sizes: list[int]) -> Iterator[bytes]:
    """`data` cut into pieces of the given sizes, in turn (the last piece takes what is left)."""
    pos, i = 0, 0
    while pos < len(data):
        step = sizes[i % len(sizes)] if sizes else len(data)
        yield data[pos : pos + step]
        pos += step
        i += 1


chunk_sizes = st.lists(st.integers(min_value=1, max_value=70), max_size=12)
# Packets a client may meet, right or wrong: every type with bodies of every size, so that the fuzzer gets
# past the framing into each handler's checks (random bytes alone are nearly always a framing error).
heads = st.sampled_from([0x20, 0x30, 0x31, 0x32, 0x33, 0x34, 0x36, 0x3B, 0x40, 0x41, 0x50, 0x62, 0x90, 0xB0, 0xD0,
                         0xD1, 0x10, 0x00, 0xF0])  # fmt: skip
bodies = st.one_of(
    st.binary(max_size=12),
    st.builds(lambda t, rest: len(t).to_bytes(2, "big") + t + rest, st.binary(max_size=8), st.binary(max_size=8)),
    st.sampled_from([b"\x00\x01", b"\x00\x02", b"\x00\x01\x01", b"\x00\x01\x00\x80", b"\x00\x00", b""]),
)
framed = st.builds(packet, heads, bodies)
streams = st.lists(st.one_of(framed, framed, framed, st.binary(min_size=1, max_size=8)), max_size=12).map(b"".join)


# ---- 8. the decoder, fuzzed --------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(streams, st.binary(max_size=600)), chunk_sizes, st.sampled_from([0, 1, 5, 127, 128, 300, MAX_PACKET_SIZE])
)
def test_the_decoder_gives_packets_or_a_protocol_error_for_any_bytes_in_any_chunking(
    data: bytes, sizes: list[int], max_size: int
) -> None:
    decoder = PacketDecoder(max_size)
    for piece in pieces(data, sizes):
        try:
            packets = decoder.feed(piece)
        except MqttProtocolError:
            assert decoder.buffered <= max_size + FIXED_HEADER_MAX
            return
        assert all(0 <= head <= 255 and len(body) <= max_size for head, body in packets)
        assert decoder.buffered <= max_size + FIXED_HEADER_MAX


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=400)), max_size=8), chunk_sizes)
def test_chunking_changes_nothing_in_what_is_decoded(sent: list[tuple[int, bytes]], sizes: list[int]) -> None:
    stream = b"".join(packet(h, b) for h, b in sent)
    decoder = PacketDecoder()
    got = [p for piece in pieces(stream, sizes) for p in decoder.feed(piece)]
    assert got == sent and decoder.buffered == 0
    whole = bytearray(stream)
    assert decode_packets(whole) == sent and not whole


@settings(max_examples=400, deadline=None)
@given(st.one_of(streams, st.binary(max_size=300)), chunk_sizes, st.sampled_from([16, MAX_PACKET_SIZE]))
def test_the_client_survives_any_bytes_in_any_chunking(
    run: Callable[[Callable[[], None]], None], data: bytes, sizes: list[int], max_size: int
) -> None:
    def feed() -> None:
        client, transport = client_on_dummy(lambda t, p: None, max_packet_size=max_size)
        sub: asyncio.Future[Any] = client._loop.create_future()
        client._pending_sub[1] = (sub, 2)  # a SUBSCRIBE of two filters, packet id 1
        waiters = [sub, client._connack]
        for _ in range(3):  # in flight: packet ids 2, 3, 4
            fut = client.publish("fleet/ZOE-001/battery", b"{}", 1, track=True)
            assert fut is not None
            waiters.append(fut)
        for piece in pieces(data, sizes):
            client.data_received(piece)  # never raises
            assert client._decoder.buffered <= max_size + FIXED_HEADER_MAX
        if client.error is not None:
            assert isinstance(client.error, MqttProtocolError) and transport.aborted
        client.connection_lost(None)
        assert all(f.done() for f in waiters)  # nobody is left waiting, whatever came

    run(feed)


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=40), st.binary(max_size=300), st.sampled_from([0, 1]), st.integers(1, 65535))
def test_parse_publish_reads_back_what_encode_publish_wrote(topic: str, payload: bytes, qos: int, pid: int) -> None:
    (head, body), *rest = decode_packets(bytearray(encode_publish(topic, payload, qos, False, pid)))
    assert not rest
    assert parse_publish(head, body) == (topic.encode().decode(), qos, pid if qos else 0, payload)


# ---- 7. malformed packets -----------------------------------------------------------------------------

MALFORMED = {
    "connack-short": b"\x20\x01\x00",
    "connack-empty": b"\x20\x00",
    "suback-short": b"\x90\x01\x00",
    "suback-no-codes": b"\x90\x02\x00\x01",
    "suback-bad-code": b"\x90\x03\x00\x01\x05",
    "suback-wrong-count": b"\x90\x03\x00\x01\x01",  # one code for the two filters of packet id 1
    "puback-short": b"\x40\x01\x00",
    "puback-long": b"\x40\x03\x00\x01\x00",
    "publish-empty": b"\x30\x00",
    "publish-one-byte": b"\x30\x01\x00",
    "publish-topic-past-body": b"\x30\x04\x00\x09ab",
    "publish-qos1-no-packet-id": b"\x32\x05\x00\x03abc",
    "publish-qos1-packet-id-0": b"\x32\x07\x00\x03abc\x00\x00",
    "publish-qos3": b"\x36\x05\x00\x03abc",
    "publish-empty-topic": b"\x30\x03\x00\x00x",
    "pingresp-with-body": b"\xd0\x01\x00",
    "pubrec": b"\x50\x02\x00\x01",
    "unsuback": b"\xb0\x02\x00\x01",
    "reserved-type": b"\xf0\x00",
    "connect-from-broker": b"\x10\x00",
    "remaining-length-of-5-bytes": b"\x30\xff\xff\xff\xff\x01",
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
async def test_a_malformed_packet_closes_the_connection_with_a_protocol_error(data: bytes) -> None:
    got: list[tuple[str, bytes]] = []
    client, transport = client_on_dummy(lambda t, p: got.append((t, p)))
    client.data_received(b"\x20\x02\x00\x00")  # CONNACK: accepted
    sub: asyncio.Future[bytes] = client._loop.create_future()
    client._pending_sub[1] = (sub, 2)
    client.data_received(data)
    assert isinstance(client.error, MqttProtocolError) and transport.aborted and not client.is_connected
    assert got == [] and transport.written == b""
    client.connection_lost(None)
    assert isinstance(sub.exception(), MqttProtocolError)  # the waiter learns why
    assert client.closed.done()


async def test_a_second_connack_is_a_protocol_error() -> None:
    client, _ = client_on_dummy()
    client.data_received(b"\x20\x02\x00\x00\x20\x02\x00\x00")
    assert isinstance(client.error, MqttProtocolError) and "second CONNACK" in str(client.error)


async def test_well_formed_packets_still_work_split_anywhere() -> None:
    got: list[tuple[str, bytes]] = []
    client, transport = client_on_dummy(lambda t, p: got.append((t, p)))
    fut = client.publish("a/b", b"x", 1, track=True)
    assert fut is not None
    stream = b"\x20\x02\x00\x00" + b"\x40\x02\x00\x01" + b"\xd0\x00" + encode_publish("c/d", b"cmd", 1, False, 513)
    for i in range(len(stream)):
        client.data_received(stream[i : i + 1])
    assert client.error is None and fut.done() and got == [("c/d", b"cmd")]
    assert transport.written.endswith(b"\x40\x02\x02\x01")  # PUBACK for packet id 513


# ---- 2. QoS 2 -------------------------------------------------------------------------------------------


async def test_a_qos2_publish_gets_no_puback_and_closes_the_connection() -> None:
    got: list[tuple[str, bytes]] = []
    client, transport = client_on_dummy(lambda t, p: got.append((t, p)))
    client.data_received(encode_publish("fleet/ZOE-001/commands", b"{}", 2, False, 7))
    assert transport.written == b""  # not the PUBACK this client used to send, nor anything else
    assert isinstance(client.error, MqttProtocolError) and "QoS 2" in str(client.error) and transport.aborted
    assert got == []


async def test_qos2_is_refused_on_the_way_out_too() -> None:
    client, transport = client_on_dummy()
    with pytest.raises(ValueError, match="qos"):
        await client.subscribe([("a", 2)])
    with pytest.raises(ValueError, match="qos"):
        client.publish("a", b"", 2)
    assert transport.written == b""


# ---- 4. the size limit ------------------------------------------------------------------------------------


async def test_a_huge_declared_length_is_refused_before_any_of_it_is_buffered() -> None:
    client, transport = client_on_dummy()
    client.data_received(b"\x30\xff\xff\xff\x7f")  # 268,435,455 bytes announced
    assert isinstance(client.error, MqttProtocolError) and "over the limit of 262144 bytes" in str(client.error)
    assert transport.aborted
    for _ in range(100):
        client.data_received(b"x" * 65536)
    assert client._decoder.buffered <= FIXED_HEADER_MAX


def test_the_limit_is_on_the_body_and_a_packet_at_it_passes() -> None:
    decoder = PacketDecoder(300)
    assert decoder.feed(packet(0x30, b"\x00\x01a" + b"x" * 297)) == [(0x30, b"\x00\x01a" + b"x" * 297)]
    with pytest.raises(MqttProtocolError, match="301 bytes"):
        decoder.feed(packet(0x30, b"x" * 301)[:3])


# ---- 1. keepalive -------------------------------------------------------------------------------------------


async def test_keepalive_fails_only_after_three_silent_ticks_and_pings_every_tick() -> None:
    client, transport = client_on_dummy()
    client._keepalive = 2
    client.data_received(b"\x20\x02\x00\x00")
    for _ in range(10):  # a broker that answers every PINGREQ
        client._keepalive_tick()
        client.data_received(b"\xd0\x00")
    assert client.error is None and transport.written == b"\xc0\x00" * 10
    client._keepalive_tick()  # the PINGREQ after the last answer
    for _ in range(SILENT_TICKS - 1):
        client._keepalive_tick()
        assert client.error is None
    client._keepalive_tick()  # 1.5 x keepalive after that PINGREQ, nothing heard
    assert isinstance(client.error, MqttError) and "no answer from the broker for 3 s" in str(client.error)
    assert transport.aborted and not client.is_connected
    client.connection_lost(None)


# ---- 5. drain ------------------------------------------------------------------------------------------------


async def test_every_drain_waiter_wakes_on_resume_even_if_one_is_cancelled() -> None:
    client, _ = client_on_dummy()
    client.pause_writing()
    waiters = [asyncio.create_task(client.drain()) for _ in range(20)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    waiters[3].cancel()
    await asyncio.sleep(0)
    client.resume_writing()
    async with asyncio.timeout(2):
        await asyncio.gather(*(w for i, w in enumerate(waiters) if i != 3))
    assert waiters[3].cancelled()


async def test_drain_waiters_see_the_transport_pause_again_and_a_lost_connection() -> None:
    client, _ = client_on_dummy()
    client.pause_writing()
    waiters = [asyncio.create_task(client.drain()) for _ in range(5)]
    await asyncio.sleep(0)
    client.resume_writing()
    client.pause_writing()  # again, before the woken waiters run: they must keep waiting
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    client.connection_lost(ConnectionResetError("reset by peer"))
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, MqttError) and "reset by peer" in str(r) for r in results)


# ---- 6. SUBACK failure ----------------------------------------------------------------------------------------


async def test_a_suback_refusal_raises_with_the_refused_filters() -> None:
    client, transport = client_on_dummy()
    task = asyncio.create_task(client.subscribe([("ok", 1), ("no", 1), ("fine", 0)]))
    await asyncio.sleep(0)
    pid = transport.written[2:4]
    client.data_received(b"\x90\x05" + pid + b"\x01\x80\x00")
    with pytest.raises(MqttSubscribeError) as e:
        await task
    assert e.value.refused == ["no"] and e.value.codes == b"\x01\x80\x00"
    assert client.is_connected and client._pending_sub == {}


# ---- 3. TLS options ------------------------------------------------------------------------------------------


def test_tls_context_checks_the_broker_and_wants_a_cert_for_a_key() -> None:
    ctx = tls_context()
    assert ctx.verify_mode is ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    with pytest.raises(ValueError, match="cert_file"):
        tls_context(key_file="client.key")


def test_the_cli_builds_a_tls_context_only_when_asked(tmp_path: Path) -> None:
    parse = build_parser().parse_args
    assert tls_from_args(parse([])) is None
    assert isinstance(tls_from_args(parse(["--tls"])), ssl.SSLContext)
    with pytest.raises(ConfigError, match="--tls"):
        tls_from_args(parse(["--ca-file", str(tmp_path / "missing.crt")]))
    (tmp_path / "junk.crt").write_text("not a certificate")
    with pytest.raises(ConfigError, match="--tls"):
        tls_from_args(parse(["--ca-file", str(tmp_path / "junk.crt")]))
    with pytest.raises(ConfigError, match="cert_file"):
        tls_from_args(parse(["--tls-key-file", str(tmp_path / "client.key")]))
    a = parse(["--key-file", "keys.txt", "--tls-key-file", "client.key"])  # two different keys, two options
    assert (str(a.key_file), str(a.tls_key_file)) == ("keys.txt", "client.key")
