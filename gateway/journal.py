"""The on-disk journal: every point is on disk before its MQTT message is acknowledged.

Points accumulate in an open batch. A batch is *sealed* when it holds
``batch_size`` points or is ``flush_interval_s`` old: its bytes go to one
segment file (written to a temporary name, fsynced, renamed), then the MQTT
messages that produced it are acknowledged, then the writer may send it to
InfluxDB. A segment is deleted once InfluxDB has it. After a crash, the
segments left on disk are replayed in order; a batch that never reached
disk was never acknowledged, so the broker delivers its messages again.

The journal is bounded (``max_bytes``). When it is full, batches stay open
and unacknowledged: the broker stops sending once our receive window is
full and keeps the rest of the QoS 1 traffic. QoS 0 messages that arrive
while the open batch is over its own bound are dropped and counted —
QoS 0 carries no delivery promise, and holding them would be unbounded.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

AckFn = Callable[[list[int]], None]


@dataclass
class Segment:
    seq: int
    path: Path
    size: int
    points: int
    data: bytes | None  # None when only on disk (memory bound or replay after restart)

    def read(self) -> bytes:
        return self.data if self.data is not None else self.path.read_bytes()


@dataclass
class _OpenBatch:
    lines: list[bytes] = field(default_factory=list)
    mids: list[int] = field(default_factory=list)
    size: int = 0
    opened: float = 0.0


class Journal:
    def __init__(
        self,
        directory: Path,
        *,
        batch_size: int,
        flush_interval_s: float,
        max_bytes: int,
        memory_bytes: int,
        fsync: bool = True,
    ) -> None:
        self.dir = directory
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.max_bytes = max_bytes
        self.memory_bytes = memory_bytes
        self.fsync = fsync
        self.segments: deque[Segment] = deque()
        self.disk_bytes = 0
        self.memory_used = 0
        self.dropped_qos0 = 0
        self._open = _OpenBatch()
        self._seq = 0
        self._ack: AckFn = lambda mids: None
        self._has_segment = asyncio.Event()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._recover()

    def _recover(self) -> None:
        for tmp in self.dir.glob("*.tmp"):
            tmp.unlink()  # never renamed, so never acknowledged: the broker still has it
        for path in sorted(self.dir.glob("*.lp")):
            seq = int(path.stem)
            size = path.stat().st_size
            self.segments.append(Segment(seq, path, size, -1, None))
            self.disk_bytes += size
            self._seq = max(self._seq, seq)
        if self.segments:
            self._has_segment.set()
            log.info(
                "journal: replaying %d batch(es), %.1f MB left from the last run",
                len(self.segments),
                self.disk_bytes / 1e6,
            )

    def set_ack(self, ack: AckFn) -> None:
        self._ack = ack

    @property
    def open_points(self) -> int:
        return len(self._open.lines)

    @property
    def pending_points(self) -> int:
        """Points not yet in InfluxDB (open batch + sealed segments known in memory)."""
        return self.open_points + sum(max(s.points, 0) for s in self.segments)

    @property
    def full(self) -> bool:
        return self.disk_bytes >= self.max_bytes

    def append(self, point: bytes, mid: int = 0, qos: int = 1) -> bool:
        """Add one point; `mid` is acknowledged once the point is on disk. False if dropped."""
        b = self._open
        if qos == 0 and self.full and b.size > self.memory_bytes:
            self.dropped_qos0 += 1
            return False
        if not b.lines:
            b.opened = asyncio.get_running_loop().time()
        b.lines.append(point)
        b.size += len(point)
        if mid:
            b.mids.append(mid)
        if len(b.lines) >= self.batch_size:
            self.seal()
        return True

    def add_mid(self, mid: int) -> None:
        """Acknowledge `mid` with the open batch, for a message that produced no point."""
        if mid:
            self._open.mids.append(mid)
            if not self._open.lines:
                self._open.opened = asyncio.get_running_loop().time()

    def seal(self) -> bool:
        """Write the open batch to disk and acknowledge it. False if the journal is full."""
        b = self._open
        if not b.lines and not b.mids:
            return True
        if b.lines and self.full:
            return False
        self._open = _OpenBatch()
        if b.lines:
            data = b"".join(b.lines)
            self._seq += 1
            path = self.dir / f"{self._seq:020d}.lp"
            tmp = path.with_suffix(".tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                if self.fsync:
                    os.fdatasync(f.fileno())
            os.rename(tmp, path)
            keep = self.memory_used + len(data) <= self.memory_bytes
            self.segments.append(Segment(self._seq, path, len(data), len(b.lines), data if keep else None))
            self.disk_bytes += len(data)
            if keep:
                self.memory_used += len(data)
            self._has_segment.set()
        self._ack(b.mids)
        return True

    def due(self, now: float) -> bool:
        b = self._open
        return bool(b.lines or b.mids) and now - b.opened >= self.flush_interval_s

    async def run_sealer(self) -> None:
        """Seal the open batch every flush interval (size-triggered seals happen in append)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.flush_interval_s / 2)
            if self.due(loop.time()):
                self.seal()

    async def next_segment(self) -> Segment:
        while not self.segments:
            self._has_segment.clear()
            await self._has_segment.wait()
        return self.segments[0]

    def done(self, seg: Segment) -> None:
        """The writer has stored (or dropped) the oldest segment: forget it."""
        assert self.segments and self.segments[0] is seg
        self.segments.popleft()
        seg.path.unlink(missing_ok=True)
        self.disk_bytes -= seg.size
        if seg.data is not None:
            self.memory_used -= seg.size
