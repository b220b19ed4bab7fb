"""The on-disk journal: every point is on disk before its MQTT message is acknowledged.

Points accumulate in an open batch. A batch is *sealed* when it holds
``batch_size`` points or is ``flush_interval_s`` old, and also as soon as
the broker stops sending because it waits for our acks: when the open batch
holds our whole receive window, or at least ``STALL_MIN`` unacknowledged
messages and nothing new came for ``STALL_S`` (a broker's own cap on what
it sends, such as EMQX's 32, is not told to the client). Otherwise a small
window would cap ingest at one window per flush interval. Its bytes go to one
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
import contextlib
import logging
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

AckFn = Callable[[list[int]], None]

# The stream has stalled on our acks when this many messages wait and nothing came for this long. The
# minimum keeps a trickle of messages (a small fleet, one a second per car) in batches of a flush interval.
STALL_S = 0.005
STALL_MIN = 16


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
        window: int = 65535,
    ) -> None:
        self.dir = directory
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.max_bytes = max_bytes
        self.memory_bytes = memory_bytes
        self.fsync = fsync
        # The receive window we announce: once the open batch holds that many unacknowledged messages the
        # broker sends nothing more until we acknowledge, so waiting for the flush interval would only idle.
        self.window = window
        self._seal_pending = False
        self._stall_check: asyncio.TimerHandle | None = None
        self.segments: deque[Segment] = deque()
        self.disk_bytes = 0
        self.memory_used = 0
        self.dropped_qos0 = 0
        self.write_errors = 0
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
            if not path.stem.isdigit():
                log.warning("journal: ignoring %s, not a journal segment", path)
                continue
            seq = int(path.stem)
            size = path.stat().st_size
            self.segments.append(Segment(seq, path, size, _count_lines(path), None))
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
        return self.open_points + sum(s.points for s in self.segments)

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
        elif len(b.mids) >= self.window:
            self._seal_soon()
        elif mid and self._stall_check is None and len(b.mids) >= STALL_MIN:
            self._watch_for_stall()
        return True

    def add_mid(self, mid: int) -> None:
        """Acknowledge `mid` with the open batch, for a message that produced no point."""
        if mid:
            self._open.mids.append(mid)
            if not self._open.lines:
                self._open.opened = asyncio.get_running_loop().time()
            if len(self._open.mids) >= self.window:
                self._seal_soon()

    def _seal_soon(self) -> None:
        # After the packets already received: a broker that sends past our window (Mosquitto does, with
        # several publishers) would otherwise get one fsync per window instead of one per read.
        if not self._seal_pending:
            self._seal_pending = True
            asyncio.get_running_loop().call_soon(self._sealed_soon)

    def _watch_for_stall(self) -> None:
        seen = len(self._open.mids)
        self._stall_check = asyncio.get_running_loop().call_later(STALL_S, self._stalled, self._open, seen)

    def _stalled(self, batch: _OpenBatch, seen: int) -> None:
        self._stall_check = None
        if batch is not self._open or len(batch.mids) < STALL_MIN:
            return  # sealed meanwhile; the next batch arms its own check
        if len(batch.mids) == seen:
            self.seal()
        else:
            self._watch_for_stall()

    def _sealed_soon(self) -> None:
        self._seal_pending = False
        if len(self._open.mids) >= self.window:
            self.seal()

    def seal(self) -> bool:
        """Write the open batch to disk and acknowledge it. False if it could not be (full, or a disk error).

        A batch that grew while the journal was full is written as several
        segments of at most ``batch_size`` points, so no write to InfluxDB is
        ever larger than a normal batch. The open batch is only replaced once
        every segment is on disk: after a failure it is still there to retry.
        """
        b = self._open
        if not b.lines and not b.mids:
            return True
        if b.lines and self.full:
            return False
        written: list[Segment] = []
        try:
            for start in range(0, len(b.lines), self.batch_size):
                written.append(self._write_segment(b.lines[start : start + self.batch_size]))
            if written and self.fsync:
                _fsync_dir(self.dir)  # the renames themselves must survive a power cut
        except OSError as e:
            self._seq -= len(written)
            for seg in written:
                with contextlib.suppress(OSError):
                    seg.path.unlink(missing_ok=True)
            self.write_errors += 1
            if self.write_errors == 1 or log.isEnabledFor(logging.DEBUG):
                log.error("journal: cannot write to %s (%s); not acknowledging until it can", self.dir, e)
            return False
        self._open = _OpenBatch()
        for seg in written:
            self.segments.append(seg)
            self.disk_bytes += seg.size
            if seg.data is not None:
                self.memory_used += seg.size
        if written:
            self._has_segment.set()
        self._ack(b.mids)
        return True

    def _write_segment(self, lines: list[bytes]) -> Segment:
        data = b"".join(lines)
        self._seq += 1
        path = self.dir / f"{self._seq:020d}.lp"
        tmp = path.with_suffix(".tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                if self.fsync:
                    os.fdatasync(f.fileno())
            os.rename(tmp, path)
        except OSError:
            self._seq -= 1
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise
        keep = self.memory_used + len(data) <= self.memory_bytes
        return Segment(self._seq, path, len(data), len(lines), data if keep else None)

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


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _count_lines(path: Path) -> int:
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            n += chunk.count(b"\n")
    return n
