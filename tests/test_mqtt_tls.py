"""Brokers that want more than a CA: a client certificate, a server name, ALPN (issue 14).

AWS IoT Core takes X.509 client certificates on 8883, or on 443 with ALPN
`mqtt`; many brokers sit behind a name that is not the address dialled. A
real Mosquitto with `require_certificate true` checks the client
certificate; ALPN, which Mosquitto 2.0 does not negotiate, is checked by a
TLS front on loopback that admits only `mqtt` (as AWS does on 443) and
relays to the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.errors import ConfigError, StartupError
from gateway.mqtt import codec
from gateway.mqtt.link import MqttLink, _ssl_context
from gateway.settings import MqttSettings, Settings
from gateway.settings_source import load_settings
from scripts import services
from tests.helpers import REPO, async_wait_for, mosquitto_pub

pytestmark = pytest.mark.integration

NAME = "broker.example"  # in the server certificate; 127.0.0.1 is not


@dataclass
class Pki:
    dir: Path

    @property
    def ca(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def cert(self) -> Path:
        return self.dir / "client.crt"

    @property
    def key(self) -> Path:
        return self.dir / "client.key"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed (scripts/setup.sh installs it)")
    d = tmp_path_factory.mktemp("pki")
    subprocess.run(["sh", str(REPO / "config/mosquitto/make-certs.sh"), str(d), NAME], check=True, capture_output=True)
    for argv in (
        ["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=gateway", "-keyout", "client.key",
         "-out", "client.csr"],
        ["openssl", "x509", "-req", "-in", "client.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
         "-days", "2", "-out", "client.crt"],
    ):  # fmt: skip
        subprocess.run(argv, cwd=d, check=True, capture_output=True)
    return Pki(d)


@dataclass
class Broker:
    plain: int
    tls: int


@pytest.fixture(scope="module")
def broker(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    tls_port = services.free_port()
    extra = (
        f"listener {tls_port} 127.0.0.1\ncafile {pki.ca}\ncertfile {pki.dir / 'server.crt'}\n"
        f"keyfile {pki.dir / 'server.key'}\nrequire_certificate true\n"
    )
    service = services.start_mosquitto(tmp_path_factory.mktemp("mosquitto"), extra_conf=extra)
    yield Broker(service.port, tls_port)
    service.stop()


@contextlib.asynccontextmanager
async def alpn_front(pki: Pki, upstream: int, seen: list[tuple[str | None, str | None]]) -> AsyncIterator[int]:
    """A TLS front admitting only ALPN `mqtt` and a client certificate, relaying to `upstream`."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    ctx.load_cert_chain(pki.dir / "server.crt", pki.dir / "server.key")
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(["mqtt"])
    names: list[str | None] = []
    ctx.sni_callback = lambda _sock, name, _ctx: names.append(name)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tls = writer.get_extra_info("ssl_object")
        alpn = tls.selected_alpn_protocol() if tls else None
        seen.append((names[-1] if names else None, alpn))
        if alpn != "mqtt":
            writer.close()
            return
        up_r, up_w = await asyncio.open_connection("127.0.0.1", upstream)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            w.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=ctx)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


def _tls(port: int, pki: Pki, **over: object) -> MqttSettings:
    opts: dict[str, object] = {
        "host": "127.0.0.1", "port": port, "client_id": f"tls-{port}", "tls": True, "ca_file": pki.ca,
        "server_name": NAME, "cert_file": pki.cert, "key_file": pki.key, "reconnect_max_s": 0.5,
        "session_expiry_s": 0,
    }  # fmt: skip
    opts.update(over)
    return MqttSettings.model_validate(opts)


async def _receives(settings: MqttSettings, broker: Broker, topic: str) -> bool:
    """Whether a link with `settings` connects and gets a message published on the plain listener."""
    got: list[codec.Message] = []
    link = MqttLink(settings, lambda m, t: got.append(m), [topic], auto_ack=True)
    task = asyncio.create_task(link.run())
    try:
        with contextlib.suppress(AssertionError):
            await async_wait_for(lambda: link.connected, 3, "connected")
        if not link.connected:
            return False
        await async_wait_for(lambda: link.stats.subacks >= 1, 5, "SUBACK")
        await mosquitto_pub(broker.plain, topic, "{}")
        await async_wait_for(lambda: got, 5, "the message")
        return True
    finally:
        task.cancel()
        await asyncio.wait([task])
        await link.close()


async def test_a_client_certificate_and_a_server_name(pki: Pki, broker: Broker) -> None:
    assert await _receives(_tls(broker.tls, pki), broker, "tls/cert")
    # The broker refuses a client without a certificate, and the server's name is checked:
    assert not await _receives(_tls(broker.tls, pki, cert_file=None, key_file=None), broker, "tls/nocert")
    assert not await _receives(_tls(broker.tls, pki, server_name=None), broker, "tls/noname")


async def test_alpn_mqtt_as_aws_iot_core_wants_on_port_443(pki: Pki, broker: Broker) -> None:
    seen: list[tuple[str | None, str | None]] = []
    async with alpn_front(pki, broker.plain, seen) as port:
        assert await _receives(_tls(port, pki, alpn=("mqtt",)), broker, "tls/alpn")
        assert seen[-1] == (NAME, "mqtt")  # SNI and ALPN as the front saw them
        assert not await _receives(_tls(port, pki), broker, "tls/noalpn")
        assert seen[-1][1] is None


def test_tls_settings_are_checked_at_start(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cert_file and mqtt\.key_file"):
        Settings.model_validate({"mqtt": {"tls": True, "cert_file": str(pki.cert)}})
    with pytest.raises(ConfigError, match=r"^mqtt.tls: must be true"):  # the one line a failed start prints
        load_settings(None, environ={"GATEWAY__DEV_MODE": "true", "GATEWAY__MQTT__ALPN": "mqtt"})
    with pytest.raises(ValueError, match="not a readable file"):
        Settings.model_validate({"mqtt": {"tls": True, "ca_file": str(tmp_path / "missing.crt")}})
    assert Settings.model_validate({"mqtt": {"tls": True, "alpn": "mqtt, x-amzn-mqtt-ca"}}).mqtt.alpn == (
        "mqtt",
        "x-amzn-mqtt-ca",
    )
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("not a certificate")
    with pytest.raises(StartupError, match=r"mqtt.cert_file, mqtt.key_file: cannot load"):
        _ssl_context(MqttSettings(tls=True, cert_file=garbage, key_file=garbage))
