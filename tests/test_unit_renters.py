"""The simulated renters' day and their command line, without a gateway."""

from __future__ import annotations

import argparse
import random

import pytest

from device_sim.cli import _probe_api, build_parser, renters_key
from device_sim.renters import wants_a_car
from gateway.errors import ConfigError
from scripts.services import free_port


def test_the_day_has_staff_in_office_hours_and_the_public_evenings_and_weekends() -> None:
    rng = random.Random(1)

    def kinds(day: int, hour: float) -> set[str | None]:
        return {wants_a_car(day * 86400 + hour * 3600, rng) for _ in range(200)}

    assert "staff" in kinds(0, 10) and "staff" not in kinds(0, 19) and "staff" not in kinds(5, 10)
    assert "public" in kinds(0, 19) and "public" in kinds(6, 11)
    assert kinds(2, 3) == {None}  # nobody at 3 a.m.


def args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_renters_need_a_key_and_a_key_needs_renters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEVICE_SIM_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="needs --api-key"):
        renters_key(args("--renters", "http://127.0.0.1:8080"))
    with pytest.raises(ConfigError, match="only used with --renters"):
        renters_key(args("--api-key", "k"))
    assert renters_key(args("--renters", "http://x", "--api-key", "k")) == "k"
    monkeypatch.setenv("DEVICE_SIM_API_KEY", "from-env")
    assert renters_key(args("--renters", "http://x")) == "from-env"


def test_max_rentals_must_be_positive() -> None:
    with pytest.raises(SystemExit):
        args("--max-rentals", "0")


async def test_an_unreachable_gateway_is_one_clear_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConfigError, match="cannot reach the gateway"):
        await _probe_api(url, "key")


def test_a_staff_booking_made_ahead_covers_the_public_one_it_is_for() -> None:
    from device_sim.renters import _body

    b = _body("ZOE-007", "S-0001", 1_795_683_600.0, 1_795_690_800.0, "staff")
    assert b == {"vehicle_id": "ZOE-007", "user_id": "S-0001", "starts_at": "2026-11-26T09:00:00.000+00:00",
                 "ends_at": "2026-11-26T11:00:00.000+00:00", "kind": "staff"}  # fmt: skip
