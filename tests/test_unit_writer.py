"""Unit tests for gateway.ingest.writer with a fake Sink: retries, drops, order and logging."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.errors import SinkRejected, SinkUnavailable
from gateway.ingest.journal import Journal
from gateway.ingest.sinks import Sink, rejected_count
from gateway.ingest.writer import Writer
from tests.helpers import make_journal


class FakeSink:
    """Fails as scripted (an exception, or None for success), then succeeds; records every attempt."""

    def __init__(self, script: list[Exception | None] | None = None) -> None:
        self.script: deque[Exception | None] = deque(script or [])
        self.attempts: list[tuple[float, bytes]] = []
        self.stored: list[bytes] = []
        self.closed = False
        self._attempted = asyncio.Event()

    async def check(self, timeout_s: float) -> None:
        return None

    async def write(self, batch: bytes) -> None:
        self.attempts.append((asyncio.get_running_loop().time(), batch))
        self._attempted.set()
        outcome = self.script.popleft() if self.script else None
        if outcome is not None:
            raise outcome
        self.stored.append(batch)

    async def until(self, cond: Callable[[], bool], timeout: float = 5) -> None:
        """Wait, without polling, until `cond` holds after some write attempt."""
        async with asyncio.timeout(timeout):
            while not cond():
                self._attempted.clear()
                await self._attempted.wait()
                await asyncio.sleep(0)  # let the writer process the attempt's outcome

    async def close(self) -> None:
        self.closed = True


def pt(i: int) -> bytes:
    return f"doors,model=zoe,vehicle_id=ZOE-001 locked=true {1795683600000 + i}\n".encode()


def batch(j: Journal, *ids: int) -> bytes:
    for i in ids:
        j.append(pt(i))
    j.seal()
    return b"".join(pt(i) for i in ids)


def lp_files(d: Path) -> list[str]:
    return sorted(p.name for p in d.glob("*.lp"))


def make_writer(j: Journal, sink: FakeSink, **kw: float) -> Writer:
    s: Sink = sink  # the fake satisfies the protocol
    return Writer(j, s, backoff_min_s=kw.get("backoff_min_s", 0.001), backoff_max_s=kw.get("backoff_max_s", 0.004))


def test_rejected_count() -> None:
    assert rejected_count('partial write: field type conflict ... dropped=2"}', 10) == 2
    assert rejected_count("unable to parse 'x': bad timestamp", 10) == 10
    assert rejected_count("dropped=0", 10) == 0


async def test_writes_a_segment_and_forgets_it(tmp_path: Path) -> None:
    j = make_journal(tmp_path)
    sink = FakeSink()
    data = batch(j, 1, 2, 3)
    w = make_writer(j, sink)
    assert await w.drain(5)
    assert sink.stored == [data]
    assert w.stats.points_written == 3 and w.stats.batches_written == 1
    assert w.stats.points_dropped == 0 and w.stats.write_errors == 0
    assert w.stats.healthy
    assert not j.segments and not lp_files(tmp_path)


async def test_drain_seals_the_open_batch(tmp_path: Path) -> None:
    j = make_journal(tmp_path)
    sink = FakeSink()
    j.append(pt(1))
    assert await make_writer(j, sink).drain(5)
    assert sink.stored == [pt(1)]


async def test_retries_on_unavailable_until_written(tmp_path: Path) -> None:
    j = make_journal(tmp_path)
    sink = FakeSink([SinkUnavailable("connection refused")] * 3)
    data = batch(j, 1, 2)
    w = make_writer(j, sink)
    assert await w.drain(5)
    assert [b for _, b in sink.attempts] == [data] * 4  # the same batch, retried
    assert sink.stored == [data]
    assert w.stats.write_errors == 3
    assert w.stats.points_written == 2 and w.stats.points_dropped == 0
    assert w.stats.healthy
    assert w.stats.last_error == "connection refused"


async def test_backoff_grows_and_is_capped(tmp_path: Path) -> None:
    j = make_journal(tmp_path)
    failures = 10
    sink = FakeSink([SinkUnavailable("down")] * failures)
    batch(j, 1)
    w = make_writer(j, sink, backoff_min_s=0.01, backoff_max_s=0.04)
    assert await w.drain(10)
    times = [t for t, _ in sink.attempts]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) == failures
    # each sleep is delay * [0.5, 1.5) with delay 0.01, 0.02, 0.04, 0.04, ...
    expected = [min(0.01 * 2**k, 0.04) for k in range(failures)]
    for gap, delay in zip(gaps, expected, strict=True):
        assert gap >= 0.5 * delay * 0.95
    # capped: uncapped doubling would sleep at least 0.5 * 0.01 * (2**10 - 1) ≈ 5 s in total
    assert sum(gaps) < 2.5


async def test_still_unavailable_at_deadline_keeps_the_segment(tmp_path: Path) -> None:
    j = make_journal(tmp_path)
    sink = FakeSink([SinkUnavailable("down")] * 10_000)
    batch(j, 1)
    w = make_writer(j, sink)
    assert not await w.drain(0.05)
    assert len(j.segments) == 1 and lp_files(tmp_path)
    assert not w.stats.healthy
    assert w.stats.points_written == 0


async def test_rejected_batch_is_dropped_and_counted(tmp_path: Path) -> None:
    j = make_journal(tmp_path)
    sink = FakeSink([SinkRejected("unable to parse: bad timestamp")])
    first = batch(j, 1, 2, 3)
    second = batch(j, 4)
    w = make_writer(j, sink)
    assert await w.drain(5)
    assert [b for _, b in sink.attempts] == [first, second]  # never retried
    assert sink.stored == [second]
    assert w.stats.points_dropped == 3
    assert w.stats.points_written == 1
    assert w.stats.batches_written == 2
    assert w.stats.healthy
    assert not j.segments


async def test_partial_write_counts_dropped_n(tmp_path: Path) -> None:
    j = make_journal(tmp_path)
    msg = '{"error":"partial write: field type conflict: input field \\"soc_pct\\" ... dropped=2"}'
    sink = FakeSink([SinkRejected(msg)])
    batch(j, 1, 2, 3, 4, 5)
    w = make_writer(j, sink)
    assert await w.drain(5)
    assert w.stats.points_dropped == 2
    assert w.stats.points_written == 3


async def test_rejection_is_logged_as_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    j = make_journal(tmp_path)
    batch(j, 1, 2)
    caplog.set_level(logging.INFO, logger="gateway.ingest.writer")
    await make_writer(j, FakeSink([SinkRejected("bad line dropped=1")])).drain(5)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "1 of 2" in errors[0].getMessage()


async def test_order_is_kept_across_failures(tmp_path: Path) -> None:
    j = make_journal(tmp_path, batch_size=2)
    expected = [batch(j, 2 * i, 2 * i + 1) for i in range(5)]
    sink = FakeSink([None, SinkUnavailable("down"), SinkUnavailable("down"), None, SinkRejected("x"), None])
    w = make_writer(j, sink)
    assert await w.drain(5)
    attempted = [b for _, b in sink.attempts]
    assert attempted == [expected[0], expected[1], expected[1], expected[1], expected[2], expected[3], expected[4]]
    assert sink.stored == [expected[0], expected[1], expected[3], expected[4]]


async def test_run_loop_writes_as_segments_are_sealed(tmp_path: Path) -> None:
    j = make_journal(tmp_path)
    sink = FakeSink([SinkUnavailable("down")])
    w = make_writer(j, sink)
    task = asyncio.create_task(w.run())
    try:
        first = batch(j, 1)
        second = batch(j, 2, 3)
        await sink.until(lambda: len(sink.stored) == 2 and not j.segments)
        assert sink.stored == [first, second]
        assert w.stats.points_written == 3
        assert not j.segments
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_replayed_segments_count_points_by_lines(tmp_path: Path) -> None:
    j = make_journal(tmp_path)
    batch(j, 1, 2, 3)
    j2 = make_journal(tmp_path)  # after a restart: points counted from the file, data only on disk
    assert j2.segments[0].points == 3
    sink = FakeSink()
    w = make_writer(j2, sink)
    assert await w.drain(5)
    assert sink.stored == [pt(1) + pt(2) + pt(3)]
    assert w.stats.points_written == 3


async def test_replayed_segment_rejected_counts_lines(tmp_path: Path) -> None:
    j = make_journal(tmp_path)
    batch(j, 1, 2, 3, 4)
    j2 = make_journal(tmp_path)
    w = make_writer(j2, FakeSink([SinkRejected("bad")]))
    assert await w.drain(5)
    assert w.stats.points_dropped == 4 and w.stats.points_written == 0


async def test_outage_logged_once_then_resumed_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    j = make_journal(tmp_path, batch_size=1)
    for i in range(3):
        j.append(pt(i))
    sink = FakeSink([SinkUnavailable("Connection refused")] * 6)
    w = make_writer(j, sink)
    caplog.set_level(logging.INFO, logger="gateway.ingest.writer")
    assert await w.drain(5)
    messages = [r.getMessage() for r in caplog.records if r.name == "gateway.ingest.writer"]
    unavailable = [m for m in messages if "unavailable" in m]
    resumed = [m for m in messages if "resumed" in m]
    assert len(unavailable) == 1 and "Connection refused" in unavailable[0]
    assert len(resumed) == 1
    assert "2 batch(es) still queued" in resumed[0]
    assert messages.index(unavailable[0]) < messages.index(resumed[0])
    assert all(r.levelno == logging.WARNING for r in caplog.records if r.name == "gateway.ingest.writer")
    assert w.stats.write_errors == 6


async def test_second_outage_is_logged_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    j = make_journal(tmp_path, batch_size=1)
    for i in range(2):
        j.append(pt(i))
    sink = FakeSink([SinkUnavailable("a"), SinkUnavailable("a"), None, SinkUnavailable("b"), None])
    caplog.set_level(logging.INFO, logger="gateway.ingest.writer")
    assert await make_writer(j, sink).drain(5)
    messages = [r.getMessage() for r in caplog.records if r.name == "gateway.ingest.writer"]
    assert len([m for m in messages if "unavailable" in m]) == 2
    assert len([m for m in messages if "resumed" in m]) == 2


async def test_no_log_when_everything_works(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    j = make_journal(tmp_path, batch_size=1)
    for i in range(3):
        j.append(pt(i))
    caplog.set_level(logging.INFO, logger="gateway.ingest.writer")
    assert await make_writer(j, FakeSink()).drain(5)
    assert [r for r in caplog.records if r.name == "gateway.ingest.writer"] == []


async def test_unhealthy_during_outage(tmp_path: Path) -> None:
    j = make_journal(tmp_path)
    sink = FakeSink([SinkUnavailable("down")] * 10_000)
    batch(j, 1)
    w = make_writer(j, sink)
    task = asyncio.create_task(w.run())
    try:
        await sink.until(lambda: not w.stats.healthy)
        assert w.stats.last_error == "down"
        sink.script.clear()  # InfluxDB is back
        await sink.until(lambda: w.stats.healthy and not j.segments)
        assert not j.segments
        assert w.stats.last_latency_ms >= 0
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
