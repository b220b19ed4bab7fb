"""A webhook receiver, as a booking system would write one: verifies every delivery, prints it, answers.

``python -m device_sim.receiver --port 9000 --secret whsec_…`` prints one
line per event it accepts. The tests use :class:`Receiver` in-process and
script its answers (a status, a delay, ``Retry-After``) per delivery.

The signature check is written from the contract (docs/booking-api.md,
after Standard Webhooks) on purpose, independently of the gateway's
``gateway/rules/webhooks.py``: two implementations, pinned to the
document's worked example by tests/test_signature_worked_example.py.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["Answer", "Delivery", "Receiver", "verify"]

TOLERANCE_S = 300  # Standard Webhooks: refuse a timestamp more than five minutes off (replays)


class BadSignature(Exception):
    pass


def _key(secret: str) -> bytes:
    if not secret.startswith("whsec_"):
        raise ValueError("a webhook secret starts with whsec_")
    try:
        return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except binascii.Error:
        raise ValueError("a webhook secret is whsec_ followed by base64") from None


def verify(secret: str, headers: dict[str, str], body: bytes, now_s: float | None = None) -> dict[str, Any]:
    """The event, if the delivery is signed with `secret` and recent; BadSignature saying why if not."""
    msg_id = headers.get("webhook-id", "")
    stamp = headers.get("webhook-timestamp", "")
    sigs = headers.get("webhook-signature", "")
    if not msg_id or not stamp.isdigit() or not sigs:
        raise BadSignature("missing webhook-id, webhook-timestamp or webhook-signature")
    now = time.time() if now_s is None else now_s
    if abs(now - int(stamp)) > TOLERANCE_S:
        raise BadSignature(f"webhook-timestamp {stamp} is more than {TOLERANCE_S} s off")
    mac = hmac.new(_key(secret), msg_id.encode() + b"." + stamp.encode() + b"." + body, hashlib.sha256)
    expected = base64.b64encode(mac.digest())
    # Several signatures may be sent, space-separated (a secret being rotated): one good one is enough.
    for sig in sigs.split():
        version, _, value = sig.partition(",")
        if version == "v1" and hmac.compare_digest(value.encode(), expected):
            event: dict[str, Any] = json.loads(body)
            if event.get("id") != msg_id:
                raise BadSignature("webhook-id is not the event's id")
            return event
    raise BadSignature("no signature matches")


@dataclass(frozen=True)
class Answer:
    """How to answer one delivery."""

    status: int = 200
    delay_s: float = 0.0  # longer than the gateway's timeout: it sees no answer
    retry_after: str | None = None


@dataclass(frozen=True)
class Delivery:
    id: str
    type: str
    event: dict[str, Any]
    timestamp: int  # webhook-timestamp
    received_s: float  # time.time() at arrival
    status: int  # what we answered


@dataclass
class Receiver:
    """An HTTP endpoint on loopback. `plan` picks the answer to each verified delivery (default: 200)."""

    secret: str
    plan: Callable[[Delivery], Answer] = field(default=lambda d: Answer())
    deliveries: list[Delivery] = field(default_factory=list)  # every verified attempt, in order
    refused: list[str] = field(default_factory=list)  # why each unverifiable request was refused
    port: int = 0
    _runner: web.AppRunner | None = None
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self, port: int = 0) -> Receiver:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        # A scripted slow answer must not hold the test up at shutdown.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            event = verify(self.secret, {k.lower(): v for k, v in request.headers.items()}, body)
        except (BadSignature, ValueError) as e:
            self.refused.append(str(e))
            return web.Response(status=400, text=str(e))
        d = Delivery(event["id"], event["type"], event, int(request.headers["webhook-timestamp"]), time.time(), 0)
        answer = self.plan(d)
        if answer.delay_s:
            await asyncio.sleep(answer.delay_s)
        self.deliveries.append(Delivery(d.id, d.type, d.event, d.timestamp, d.received_s, answer.status))
        self._arrived.set()
        headers = {"Retry-After": answer.retry_after} if answer.retry_after is not None else None
        return web.Response(status=answer.status, headers=headers)

    # -- for tests --

    def accepted(self, type_: str | None = None) -> list[Delivery]:
        """Deliveries answered 2xx (of one type), first arrival of each id only."""
        seen: set[str] = set()
        out = []
        for d in self.deliveries:
            if 200 <= d.status < 300 and (type_ is None or d.type == type_) and d.id not in seen:
                seen.add(d.id)
                out.append(d)
        return out

    def attempts(self) -> Counter[str]:
        return Counter(d.id for d in self.deliveries)

    async def wait(self, cond: Callable[[Receiver], Any], timeout: float = 10.0, what: str = "deliveries") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            got = cond(self)
            if got:
                return got
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}: {len(self.deliveries)} deliveries so far")
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), min(left, 0.2))


def _describe(d: Delivery) -> str:
    data = d.event.get("data", {})
    what = data.get("message") or data.get("vehicle_id") or ""
    return f"{d.event.get('timestamp')} {d.type:<20} {d.id} {what}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m device_sim.receiver",
        description="Receive the gateway's webhooks on 127.0.0.1, verify each signature, print each event.",
    )
    p.add_argument("--port", type=int, default=9000, help="port to listen on (default 9000)")
    p.add_argument("--secret", required=True, help="the endpoint's secret, whsec_… as in webhooks.endpoints")
    a = p.parse_args(argv)
    try:
        _key(a.secret)
    except ValueError as e:
        print(f"error: --secret: {e}", file=sys.stderr)
        return 2

    def show(d: Delivery) -> Answer:
        print(_describe(d), flush=True)
        return Answer()

    async def serve() -> None:
        r = await Receiver(a.secret, plan=show).start(a.port)
        print(f"listening on {r.url}; Ctrl-C to stop", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await r.stop()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        return 0
    except OSError as e:
        print(f"error: cannot listen on port {a.port}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
