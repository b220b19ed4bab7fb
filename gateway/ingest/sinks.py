"""Where batches of line protocol go: InfluxDB over API v1 or v2, behind one small protocol.

Failures are sorted here, at the boundary: anything that may work later
(connection refused, timeout, 5xx, auth) is :class:`SinkUnavailable` and the
batch is retried; a 4xx about the data is :class:`SinkRejected` and the
batch is dropped and counted, since no retry can fix it.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import aiohttp

from gateway.errors import SinkRejected, SinkUnavailable, StartupError
from gateway.settings import InfluxSettings

_DROPPED_RE = re.compile(r"dropped=(\d+)")


class Sink(Protocol):
    """Writes one batch of newline-terminated line-protocol points (ms precision)."""

    async def write(self, batch: bytes) -> None: ...

    async def check(self, timeout_s: float) -> None:
        """At start: return once InfluxDB answers, or raise StartupError after `timeout_s`."""
        ...

    async def close(self) -> None: ...


async def wait_reachable(url: str, ping: Callable[[], Awaitable[str | None]], timeout_s: float) -> None:
    """Call `ping` (None when InfluxDB answered, else what went wrong) until it answers or time is up."""
    deadline = time.monotonic() + timeout_s
    while True:
        problem = await ping()
        if problem is None:
            return
        if time.monotonic() >= deadline:
            raise StartupError(f"influx.url: InfluxDB at {url} is not reachable ({problem})")
        await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


def rejected_count(message: str, lines: int) -> int:
    """How many points InfluxDB says it dropped, or the whole batch if it does not say."""
    m = _DROPPED_RE.search(message)
    return int(m.group(1)) if m else lines


class InfluxV1Sink:
    """``POST /write?db=…&precision=ms``: InfluxDB 1.x (Debian ships 1.6), and 1.8+/2.x compat."""

    def __init__(self, settings: InfluxSettings) -> None:
        self._s = settings
        self._url = settings.url.rstrip("/")
        auth = None
        if settings.username:
            pw = settings.password.get_secret_value() if settings.password else ""
            auth = aiohttp.BasicAuth(settings.username, pw)
        self._session = aiohttp.ClientSession(auth=auth, timeout=aiohttp.ClientTimeout(total=settings.timeout_s))
        self._db_ready = not settings.create_database

    async def _create_db(self) -> None:
        async with self._session.post(f"{self._url}/query", data={"q": f'CREATE DATABASE "{self._s.database}"'}) as r:
            if r.status >= 300:
                raise SinkUnavailable(f"CREATE DATABASE answered {r.status}: {(await r.text())[:200]}")
        self._db_ready = True

    async def check(self, timeout_s: float) -> None:
        async def ping() -> str | None:
            try:
                async with self._session.get(f"{self._url}/ping", timeout=aiohttp.ClientTimeout(total=2)) as r:
                    return None if r.status < 500 else f"HTTP {r.status}"
            except (TimeoutError, aiohttp.ClientError, OSError) as e:
                return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__

        await wait_reachable(self._url, ping, timeout_s)

    async def write(self, batch: bytes) -> None:
        for attempt in (1, 2):
            try:
                if not self._db_ready:
                    await self._create_db()
                params = {"db": self._s.database, "precision": "ms"}
                async with self._session.post(f"{self._url}/write", params=params, data=batch) as r:
                    if r.status == 204:
                        return
                    text = (await r.text())[:500]
            except (TimeoutError, aiohttp.ClientError, OSError) as e:
                raise SinkUnavailable(f"{type(e).__name__}: {e}") from e
            if r.status == 404 and "database not found" in text and self._s.create_database:
                # Dropped behind our back, or a just-started InfluxDB that has not made it visible yet:
                # create it and write again at once, rather than report an outage that is not one.
                self._db_ready = False
                if attempt == 1:
                    continue
                raise SinkUnavailable(f"database {self._s.database} not found; will create it")
            break
        if r.status in (400, 413, 422):
            raise SinkRejected(text)
        raise SinkUnavailable(f"HTTP {r.status}: {text}")

    async def close(self) -> None:
        await self._session.close()


class InfluxV2Sink:
    """``POST /api/v2/write`` through influxdb-client's asyncio API: InfluxDB 1.8+, 2.x, 3.x, Cloud."""

    def __init__(self, settings: InfluxSettings) -> None:
        from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync

        self._s = settings
        token = settings.token.get_secret_value() if settings.token else ""
        self._client = InfluxDBClientAsync(
            url=settings.url, token=token, org=settings.org, timeout=int(settings.timeout_s * 1000)
        )
        self._api = self._client.write_api()

    async def check(self, timeout_s: float) -> None:
        async def ping() -> str | None:
            try:
                return None if await self._client.ping() else "no answer to ping"
            except Exception as e:  # influxdb-client raises its own ApiException for any HTTP error
                return f"{type(e).__name__}: {str(e)[:200]}"

        await wait_reachable(self._s.url, ping, timeout_s)

    async def write(self, batch: bytes) -> None:
        from influxdb_client.domain.write_precision import WritePrecision
        from influxdb_client.rest import ApiException

        try:
            await self._api.write(
                bucket=self._s.bucket,
                org=self._s.org,
                record=batch,
                write_precision=WritePrecision.MS,  # type: ignore[arg-type]  # generated enum holds plain strings
            )
        except ApiException as e:
            text = f"HTTP {e.status}: {str(e.body)[:500]}"
            if e.status in (400, 413, 422):
                raise SinkRejected(text) from e
            raise SinkUnavailable(text) from e
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            raise SinkUnavailable(f"{type(e).__name__}: {e}") from e

    async def close(self) -> None:
        await self._client.close()  # type: ignore[no-untyped-call]


def make_sink(settings: InfluxSettings) -> Sink:
    return InfluxV2Sink(settings) if settings.api_version == 2 else InfluxV1Sink(settings)
