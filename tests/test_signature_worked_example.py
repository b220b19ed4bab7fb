"""Both signature implementations pinned to the worked examples of docs/car-integration.md (commands)
and docs/booking-api.md (webhooks).

The gateway (``gateway.signing``) and the simulated car (``device_sim.commands``) implement the contract
independently. Every value here is parsed out of the document, so the test fails when the document, the
gateway or the car drift apart.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import orjson
import pytest

from device_sim import commands as car
from gateway import signing as gw

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "car-integration.md").read_text(encoding="utf-8")
HEX64 = r"([0-9a-f]{64})"


def doc_values(pattern: str) -> tuple[str, ...]:
    """The groups of the one match of `pattern` in the document; a space in `pattern` matches any run of whitespace."""
    found = list(re.finditer(pattern.replace(" ", r"\s+"), DOC))
    assert len(found) == 1, f"docs/car-integration.md: expected one match of {pattern!r}, found {len(found)}"
    return found[0].groups()


def doc_value(pattern: str) -> str:
    (value,) = doc_values(pattern)
    return value


def doc_command() -> dict[str, Any]:
    """The command payload shown in the "Commands" section."""
    section = DOC.split("## Commands", 1)[1]
    block = re.search(r"```json\n(.*?)```", section, re.S)
    assert block is not None, "docs/car-integration.md: no JSON command block under ## Commands"
    cmd = orjson.loads(block.group(1))
    assert isinstance(cmd, dict)
    return cmd


CMD = doc_command()
COMMAND_KEY = bytes.fromhex(doc_value(r"with the command key `" + HEX64 + "`"))
SIGNING_STRING, SIGNATURE = doc_values(r"signs the string (\S+) to `" + HEX64 + "`")
LOCK_SIGNATURE = doc_value(r"operator lock [^\n]*? signs `[^`]*` to `" + HEX64 + "`")
MASTER_KEY, DERIVED_VID, DERIVED_KEY = doc_values(
    r"the master key `([^`]+)` gives `([^`]+)` the command key `" + HEX64 + "`"
)
UNSIGNED = {k: v for k, v in CMD.items() if k != "signature"}
LOCK = {**CMD, "action": "lock", "reservation_id": None, "signature": LOCK_SIGNATURE}
VID = str(CMD["vehicle_id"])
NOW = car.parse_time(CMD["issued_at"])


def test_the_document_is_self_consistent() -> None:
    assert CMD["signature"] == SIGNATURE
    assert SIGNING_STRING.split("|") == [CMD[f] or "" for f in car.SIGNED_FIELDS]
    assert len(COMMAND_KEY) == 32 and len(bytes.fromhex(DERIVED_KEY)) == 32
    assert NOW is not None


# (a) the gateway reproduces the document


def test_gateway_derives_the_documented_command_key() -> None:
    assert gw.vehicle_key(MASTER_KEY, DERIVED_VID).hex() == DERIVED_KEY


def test_gateway_builds_the_documented_signing_string() -> None:
    assert gw.signing_string(UNSIGNED) == SIGNING_STRING.encode()


def test_gateway_signs_to_the_documented_signatures() -> None:
    assert gw.sign(UNSIGNED, COMMAND_KEY) == SIGNATURE
    assert gw.sign(LOCK, COMMAND_KEY) == LOCK_SIGNATURE
    assert gw.verify(CMD, COMMAND_KEY) and gw.verify(LOCK, COMMAND_KEY)


# (b) the car, with its own code, reproduces the document and accepts its commands


def test_car_derives_the_documented_command_key() -> None:
    assert car.vehicle_key(MASTER_KEY, DERIVED_VID).hex() == DERIVED_KEY


def test_car_builds_the_documented_signing_string() -> None:
    assert car.signing_string(CMD) == SIGNING_STRING.encode()


def test_car_accepts_the_documented_signatures() -> None:
    assert car.signature_is_valid(CMD, COMMAND_KEY)
    assert car.signature_is_valid(LOCK, COMMAND_KEY)


def test_car_executes_the_documented_commands() -> None:
    assert NOW is not None
    v = car.verify_command(CMD, VID, COMMAND_KEY, NOW, car.SeenCommands())
    assert (v.ok, v.reason, v.action) == (True, None, CMD["action"])
    v = car.verify_command(LOCK, VID, COMMAND_KEY, NOW, car.SeenCommands())
    assert (v.ok, v.action) == (True, "lock")


# (c) the car refuses the example once anything is changed


def one_char_changed(sig: str, at: int) -> str:
    return sig[:at] + ("0" if sig[at] != "0" else "1") + sig[at + 1 :]


@pytest.mark.parametrize("at", [0, 31, 63])
def test_car_refuses_the_example_with_one_signature_character_changed(at: int) -> None:
    forged = {**CMD, "signature": one_char_changed(SIGNATURE, at)}
    assert not car.signature_is_valid(forged, COMMAND_KEY)
    assert NOW is not None
    assert car.verify_command(forged, VID, COMMAND_KEY, NOW, car.SeenCommands()).reason == "bad_signature"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("action", "lock"),
        ("command_id", "0b9c6a52-3c4e-4f4e-9a53-5f0e0f7c2a11"),
        ("reservation_id", None),
        ("issued_at", "2026-11-26T10:00:00.001Z"),
        ("expires_at", "2026-11-26T10:05:10.000Z"),
    ],
)
def test_car_refuses_the_example_with_a_field_changed(field: str, value: Any) -> None:
    tampered = {**CMD, field: value}
    assert not car.signature_is_valid(tampered, COMMAND_KEY)
    assert NOW is not None
    assert car.verify_command(tampered, VID, COMMAND_KEY, NOW, car.SeenCommands()).reason == "bad_signature"


def test_car_refuses_the_example_under_another_key_or_in_another_form() -> None:
    assert not car.signature_is_valid(CMD, car.vehicle_key(MASTER_KEY, VID))  # not this car's documented key
    assert not car.signature_is_valid({**CMD, "signature": SIGNATURE.upper()}, COMMAND_KEY)
    assert not car.signature_is_valid({**CMD, "signature": SIGNATURE[:-1]}, COMMAND_KEY)
    assert not car.signature_is_valid({**CMD, "signature": SIGNATURE[:-1] + "é"}, COMMAND_KEY)
    assert not car.signature_is_valid(UNSIGNED, COMMAND_KEY)
    assert NOW is not None
    assert car.verify_command(CMD, "ZOE-018", COMMAND_KEY, NOW, car.SeenCommands()).reason == "wrong_vehicle"


# the car's implementation stays its own


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_car_command_checks_import_nothing_from_the_gateway() -> None:
    imports = imported_modules(ROOT / "device_sim" / "commands.py")
    assert not {m for m in imports if m == "gateway" or m.startswith("gateway.")}, imports


def test_no_simulator_module_imports_gateway_signing() -> None:
    offenders = [
        p.name
        for p in sorted((ROOT / "device_sim").glob("*.py"))
        if any(m == "gateway.signing" or m.startswith("gateway.signing.") for m in imported_modules(p))
    ]
    assert offenders == []


# -- webhooks: docs/booking-api.md ---------------------------------------------------------------------------

BOOKING_DOC = (ROOT / "docs" / "booking-api.md").read_text(encoding="utf-8")
EXAMPLE = BOOKING_DOC.split("### A worked example to test your receiver against", 1)[1]


def webhook_example() -> tuple[str, dict[str, str], bytes]:
    secret = re.search(r"With the secret `(whsec_[A-Za-z0-9+/=]+)`", EXAMPLE)
    block = re.search(r"```\n(webhook-id: .*?)```", EXAMPLE, re.S)
    body = re.search(r"```json\n(.*?)\n```", EXAMPLE, re.S)
    assert secret and block and body, "docs/booking-api.md: the webhook worked example is incomplete"
    headers = dict(line.split(": ", 1) for line in block.group(1).strip().splitlines())
    return secret.group(1), headers, body.group(1).encode()


WH_SECRET, WH_HEADERS, WH_BODY = webhook_example()
WH_TS = int(WH_HEADERS["webhook-timestamp"])


def test_the_gateway_signs_the_webhook_example_as_documented() -> None:
    from gateway.rules.webhooks import decode_secret, headers

    assert headers(decode_secret(WH_SECRET), WH_HEADERS["webhook-id"], WH_TS, WH_BODY) == WH_HEADERS
    assert orjson.loads(WH_BODY)["id"] == WH_HEADERS["webhook-id"]


def test_the_example_receiver_accepts_it_and_refuses_any_change() -> None:
    from device_sim.receiver import BadSignature, verify

    assert verify(WH_SECRET, WH_HEADERS, WH_BODY, now_s=WH_TS)["type"] == "alert.opened"
    for headers, body in [
        (WH_HEADERS, WH_BODY.replace(b"34.0", b"35.0")),
        ({**WH_HEADERS, "webhook-timestamp": str(WH_TS + 1)}, WH_BODY),
        ({**WH_HEADERS, "webhook-id": WH_HEADERS["webhook-id"][:-1] + "5"}, WH_BODY),
    ]:
        with pytest.raises(BadSignature):
            verify(WH_SECRET, headers, body, now_s=WH_TS)


def test_the_python_snippet_in_the_document_verifies_it() -> None:
    section = BOOKING_DOC.split("### Verifying a signature", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None, "docs/booking-api.md: no Python snippet under Verifying a signature"
    ns: dict[str, Any] = {}
    exec(compile(code.group(1), "docs/booking-api.md", "exec"), ns)  # the document's own code, as a reader runs it

    class Clock:
        @staticmethod
        def time() -> float:
            return WH_TS + 1.0

    ns["time"] = Clock
    assert ns["verify"](WH_SECRET, WH_HEADERS, WH_BODY) is True
    assert ns["verify"](WH_SECRET, WH_HEADERS, WH_BODY + b" ") is False
