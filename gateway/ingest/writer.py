"""Sends sealed journal segments to InfluxDB, oldest first, one at a time.

Order is kept, so a replay after an outage lands in the order it arrived.
A connection failure is logged once, retried with capped exponential
back-off, and followed by one "resumed" line; a batch InfluxDB refuses as
invalid is dropped and its points counted.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.errors import SinkRejected, SinkUnavailable
from gateway.ingest.journal import Journal, Segment
from gateway.ingest.sinks import Sink, rejected_count

log = logging.getLogger(__name__)


@dataclass
class WriterStats:
    points_written: int = 0
    points_dropped: int = 0
    batches_written: int = 0
    write_errors: int = 0
    last_latency_ms: float = 0.0
    healthy: bool = True
    last_error: str = ""


class Writer:
    def __init__(
        self,
        journal: Journal,
        sink: Sink,
        *,
        backoff_min_s: float = 0.2,
        backoff_max_s: float = 10.0,
        observe: Callable[[float], None] | None = None,
    ) -> None:
        self.journal = journal
        self._observe = observe  # the write-duration histogram, in seconds
        self.sink = sink
        self.stats = WriterStats()
        self._backoff_min = backoff_min_s
        self._backoff_max = backoff_max_s

    async def run(self) -> None:
        while True:
            seg = await self.journal.next_segment()
            await self._store(seg)

    async def _store(self, seg: Segment) -> None:
        delay = self._backoff_min
        points = seg.points
        try:
            data = seg.read()
        except OSError as e:
            # Retrying cannot bring back a segment the disk lost; the rest must not wait behind it.
            log.error("journal segment %s unreadable (%s); %d points lost", seg.path, e, points)
            self.stats.points_dropped += points
            self.journal.done(seg)
            return
        while True:
            t0 = time.perf_counter()
            try:
                await self.sink.write(data)
            except SinkUnavailable as e:
                self.stats.write_errors += 1
                self.stats.last_error = str(e)
                if self.stats.healthy:
                    log.warning("InfluxDB unavailable (%s); keeping data in the journal and retrying", e)
                    self.stats.healthy = False
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, self._backoff_max)
                continue
            except SinkRejected as e:
                dropped = rejected_count(str(e), points)
                self.stats.points_dropped += dropped
                self.stats.points_written += points - dropped
                log.error("InfluxDB refused %d of %d points as invalid, dropped them: %s", dropped, points, e)
            else:
                self.stats.points_written += points
            break
        elapsed = time.perf_counter() - t0
        self.stats.last_latency_ms = elapsed * 1000
        if self._observe is not None:
            self._observe(elapsed)
        self.stats.batches_written += 1
        if not self.stats.healthy:
            self.stats.healthy = True
            log.warning(
                "InfluxDB writes resumed; %d batch(es) still queued in the journal", len(self.journal.segments) - 1
            )
        self.journal.done(seg)

    async def drain(self, deadline_s: float) -> bool:
        """Write what is queued until empty or the deadline; True if everything went out."""
        self.journal.seal()
        try:
            async with asyncio.timeout(deadline_s):
                while self.journal.segments:
                    await self._store(self.journal.segments[0])
        except TimeoutError:
            return False
        except Exception:  # shutdown goes on; what is left stays journaled for the next start
            log.exception("draining the journal to InfluxDB failed")
            return False
        return True
