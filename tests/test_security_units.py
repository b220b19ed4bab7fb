"""Pure parts of the protections: the rate limiter, the credential derivation, the provision CLI."""

from __future__ import annotations

import base64
import hashlib
import hmac
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.__main__ import main
from gateway.http.ratelimit import RateLimiter
from gateway.provision import car_credentials, mqtt_password, passwd_line, render
from gateway.signing import vehicle_key
from tests.helpers import REPO

MASTER = "unit-master-key-0123456789"

# ---- rate limiter ---------------------------------------------------------------------------------


def test_a_key_gets_its_burst_then_waits_for_a_token() -> None:
    rl = RateLimiter(per_min=3)
    assert [rl.take("k1", 100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = rl.take("k1", 100.0)
    assert wait == pytest.approx(20.0)  # 3 a minute: one token every 20 s
    assert RateLimiter.retry_after(wait) == "20"
    assert rl.take("k1", 110.0) == pytest.approx(10.0)  # half a token back
    assert rl.take("k1", 120.0) == 0.0


def test_keys_have_separate_buckets() -> None:
    rl = RateLimiter(per_min=1)
    assert rl.take("k1", 0.0) == 0.0
    assert rl.take("k1", 0.0) > 0
    assert rl.take("k2", 0.0) == 0.0


def test_an_idle_key_refills_only_up_to_the_burst() -> None:
    rl = RateLimiter(per_min=2)
    rl.take("k", 0.0)
    assert [rl.take("k", 3600.0) for _ in range(3)][:2] == [0.0, 0.0]
    assert rl.take("k", 3600.0) > 0


def test_retry_after_is_whole_seconds_rounded_up_at_least_one() -> None:
    assert RateLimiter.retry_after(0.01) == "1"
    assert RateLimiter.retry_after(1.2) == "2"
    with pytest.raises(ValueError):
        RateLimiter(per_min=0)


# ---- credential derivation --------------------------------------------------------------------------


def test_the_mqtt_password_is_an_hmac_of_its_own_label() -> None:
    mac = hmac.new(MASTER.encode(), b"mqtt-password:ZOE-017", hashlib.sha256).digest()
    assert mqtt_password(MASTER, "ZOE-017") == base64.urlsafe_b64encode(mac).decode()[:32]
    assert len(mqtt_password(MASTER, "ZOE-017")) == 32


def test_credentials_differ_per_car_and_reveal_neither_key() -> None:
    a, b = car_credentials(MASTER, "ZOE-001"), car_credentials(MASTER, "ZOE-002")
    assert a.password != b.password and a.command_key_hex != b.command_key_hex
    assert a.command_key_hex == vehicle_key(MASTER, "ZOE-001").hex() and len(a.command_key_hex) == 64
    # The password is not the command key, nor derived the same way.
    assert a.password not in (a.command_key_hex, base64.urlsafe_b64encode(vehicle_key(MASTER, "ZOE-001")).decode())
    assert a.username == "ZOE-001"
    with pytest.raises(ValueError):
        car_credentials(MASTER, "zoe/#")


def test_passwd_line_is_mosquittos_pbkdf2_sha512_format() -> None:
    line = passwd_line("ZOE-001", "pw", salt=b"0123456789ab")
    user, hashed = line.split(":", 1)
    _, alg, iterations, salt, digest = hashed.split("$")
    assert (user, alg, iterations) == ("ZOE-001", "7", "101")
    assert base64.b64decode(salt) == b"0123456789ab"
    assert base64.b64decode(digest) == hashlib.pbkdf2_hmac("sha512", b"pw", b"0123456789ab", 101)
    with pytest.raises(ValueError):
        passwd_line("a:b", "pw")


def test_render_lists_the_values_and_the_topics_but_not_the_master_key() -> None:
    text = render(car_credentials(MASTER, "ZOE-001"), "fleet")
    assert mqtt_password(MASTER, "ZOE-001") in text and vehicle_key(MASTER, "ZOE-001").hex() in text
    assert "fleet/ZOE-001/commands " in text and "fleet/ZOE-001/battery" in text
    assert MASTER not in text


# ---- python -m gateway provision ----------------------------------------------------------------------

PROD = {"GATEWAY__DEV_MODE": "false", "GATEWAY__COMMANDS__MASTER_KEY": MASTER}


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(REPO / "config" / "gateway.yaml"), *args],
        capture_output=True, text=True, timeout=60, check=False, cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "GATEWAY__FLEET__FILE": str(REPO / "config" / "fleet.yaml"), **env},
    )  # fmt: skip


def test_provision_prints_the_cars_values_again_and_again() -> None:
    first, again = run(["provision", "ZOE-017"], PROD), run(["provision", "ZOE-017"], PROD)
    assert first.returncode == 0, first.stderr
    assert mqtt_password(MASTER, "ZOE-017") in first.stdout and vehicle_key(MASTER, "ZOE-017").hex() in first.stdout
    assert "mqtt username  ZOE-017" in first.stdout and "passwd line    ZOE-017:$7$101$" in first.stdout
    strip = [ln for ln in first.stdout.splitlines() if not ln.startswith("passwd line")]  # the salt is random
    assert strip == [ln for ln in again.stdout.splitlines() if not ln.startswith("passwd line")]
    assert MASTER not in first.stdout + first.stderr


def test_provision_all_writes_the_password_file(tmp_path: Path) -> None:
    out = tmp_path / "passwd"
    env = PROD | {"GATEWAY__MQTT__USERNAME": "gateway", "GATEWAY__MQTT__PASSWORD": "gw-password-0123456789"}
    r = run(["provision", "--all", "--exclude", "ZOE-017", "--passwd-file", str(out)], env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and MASTER not in r.stderr
    users = [ln.split(":", 1)[0] for ln in out.read_text().splitlines()]
    assert users[0] == "gateway" and "ZOE-017" not in users and len(users) == 1 + 28
    assert out.stat().st_mode & 0o077 == 0, "the password file is for its owner only"


@pytest.mark.parametrize(
    ("args", "env", "names"),
    [
        (["provision", "ZOE-001"], {"GATEWAY__DEV_MODE": "false", "GATEWAY__COMMANDS__MASTER_KEY": "change-me"},
         "commands.master_key"),
        (["provision", "ZOE-001"], {"GATEWAY__DEV_MODE": "false"}, "commands.master_key"),
        (["provision", "NOPE-999"], PROD, "NOPE-999"),
        (["provision"], PROD, "--all"),
        (["provision", "--all", "ZOE-001"], PROD, "--all"),
    ],
    ids=["example-master", "no-master", "unknown-vehicle", "nothing", "both"],
)  # fmt: skip
def test_provision_refuses_with_one_line_naming_the_problem(args: list[str], env: dict[str, str], names: str) -> None:
    r = run(args, env)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and names in r.stderr, r.stderr


def test_provision_help_explains_itself(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["provision", "--help"])
    text = capsys.readouterr().out
    for word in ("command key", "password file", "--all", "--exclude", "--passwd-file", "never printed"):
        assert word in text, word


# ---- the simulator's broker login ---------------------------------------------------------------------


def test_connect_carries_user_name_and_password() -> None:
    from device_sim.mqtt import encode_connect

    packet = encode_connect("sim-fleet-ZOE-001", 60, True, None, "ZOE-001", "pw-123")
    flags = packet[9]  # fixed header (2) + "MQTT" (6) + level (1)
    assert flags & 0x80 and flags & 0x40
    assert packet.endswith(b"\x00\x07ZOE-001\x00\x06pw-123")
    assert not encode_connect("c", 60, True, None)[9] & 0xC0


def test_per_car_credentials_need_the_master_key_and_one_connection_per_car() -> None:
    from device_sim import SimConfig

    with pytest.raises(ValueError, match="master key"):
        SimConfig(per_car_credentials=True)
    with pytest.raises(ValueError, match="multiplexed"):
        SimConfig(per_car_credentials=True, master_key=MASTER, connections=4)
    with pytest.raises(ValueError, match="user name"):
        SimConfig(password="pw")
    assert SimConfig(per_car_credentials=True, master_key=MASTER).per_car_credentials


def test_the_simulator_cli_takes_a_shared_or_a_per_car_login(monkeypatch: pytest.MonkeyPatch) -> None:
    from device_sim.cli import build_parser, config_from_args

    monkeypatch.delenv("GATEWAY__COMMANDS__MASTER_KEY", raising=False)
    monkeypatch.setenv("DEVICE_SIM_PASSWORD", "from-env")
    cfg = config_from_args(build_parser().parse_args(["--username", "car"]))
    assert (cfg.username, cfg.password, cfg.per_car_credentials) == ("car", "from-env", False)
    cfg = config_from_args(build_parser().parse_args(["--per-car-credentials", "--master-key", MASTER]))
    assert cfg.per_car_credentials and cfg.username is None and cfg.master_key == MASTER


# ---- a car cannot acknowledge another car's command ----------------------------------------------------


async def test_an_ack_from_another_car_does_not_complete_a_command() -> None:
    import asyncio

    import orjson

    from gateway.booking.dispatcher import CommandDispatcher
    from gateway.errors import PayloadError

    class Link:
        def __init__(self) -> None:
            self.sent: list[dict[str, object]] = []
            self.published = asyncio.Event()

        def publish(
            self, topic: str, payload: bytes, qos: int, expiry_s: float | None = None, on_dropped: object = None
        ) -> None:
            self.sent.append(orjson.loads(payload))
            self.published.set()

    class Journal:
        def append(self, line: str) -> None:
            pass

    link = Link()
    d = CommandDispatcher(link, Journal(), MASTER, "fleet", timeout_s=0.5)  # type: ignore[arg-type]
    task = asyncio.create_task(d.send("ZOE-002", "unlock", "R-1", "test"))
    await asyncio.wait_for(link.published.wait(), 5)
    forged = {"command_id": link.sent[0]["command_id"], "status": "done"}
    with pytest.raises(PayloadError, match="ZOE-001"):
        d.on_ack("ZOE-001", forged, 0)  # car A, on its own ack topic, answering for car B
    outcome = await task
    assert outcome.result == "timeout"
