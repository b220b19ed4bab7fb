"""Unit tests for gateway.ingest.journal: on-disk batches, acknowledgements, bounds and crash recovery."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.helpers import make_journal as make


class Acks:
    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def __call__(self, mids: list[int]) -> None:
        self.calls.append(list(mids))

    @property
    def all(self) -> list[int]:
        return [m for c in self.calls for m in c]


def pt(i: int) -> bytes:
    return f"battery,model=zoe,vehicle_id=ZOE-001 soc_pct={i}.0 {1795683600000 + i}\n".encode()


def files(d: Path, pattern: str) -> list[str]:
    return sorted(p.name for p in d.glob(pattern))


def lp_files(d: Path) -> list[str]:
    return files(d, "*.lp")


async def test_append_keeps_points_open_until_sealed(tmp_path: Path) -> None:
    j = make(tmp_path)
    acks = Acks()
    j.set_ack(acks)
    assert j.append(pt(1), mid=11)
    assert j.append(pt(2), mid=12)
    assert j.open_points == 2 and j.pending_points == 2
    assert acks.calls == [] and lp_files(tmp_path) == []  # nothing acknowledged before it is on disk
    assert j.seal()
    assert acks.calls == [[11, 12]]
    assert lp_files(tmp_path) == [f"{1:020d}.lp"]
    assert (tmp_path / f"{1:020d}.lp").read_bytes() == pt(1) + pt(2)
    assert j.open_points == 0
    assert len(j.segments) == 1 and j.segments[0].points == 2
    assert j.pending_points == 2
    assert j.disk_bytes == len(pt(1) + pt(2))


async def test_ack_happens_after_the_file_is_on_disk(tmp_path: Path) -> None:
    j = make(tmp_path)
    seen: list[list[str]] = []
    j.set_ack(lambda mids: seen.append(lp_files(tmp_path)))
    j.append(pt(1), mid=1)
    j.seal()
    assert seen == [[f"{1:020d}.lp"]]


async def test_batch_size_triggers_seal(tmp_path: Path) -> None:
    j = make(tmp_path, batch_size=3)
    acks = Acks()
    j.set_ack(acks)
    for i in range(7):
        j.append(pt(i), mid=100 + i)
    assert [s.points for s in j.segments] == [3, 3]
    assert acks.calls == [[100, 101, 102], [103, 104, 105]]
    assert j.open_points == 1
    assert j.pending_points == 7


async def test_qos0_points_carry_no_mid(tmp_path: Path) -> None:
    j = make(tmp_path)
    acks = Acks()
    j.set_ack(acks)
    j.append(pt(1), mid=0, qos=0)
    j.append(pt(2), mid=5)
    j.seal()
    assert acks.calls == [[5]]
    assert j.segments[0].points == 2


async def test_add_mid_without_point_is_acknowledged_with_the_batch(tmp_path: Path) -> None:
    j = make(tmp_path)
    acks = Acks()
    j.set_ack(acks)
    j.add_mid(7)  # e.g. a status message with nothing stored
    j.add_mid(0)  # QoS 0: nothing to acknowledge
    assert j.seal()
    assert acks.calls == [[7]]
    assert lp_files(tmp_path) == [] and not j.segments  # no empty segment


async def test_seal_of_empty_batch_does_nothing(tmp_path: Path) -> None:
    j = make(tmp_path)
    acks = Acks()
    j.set_ack(acks)
    assert j.seal()
    assert acks.calls == [] and not j.segments


async def test_due_after_flush_interval(tmp_path: Path) -> None:
    j = make(tmp_path, flush_interval_s=0.5)
    loop = asyncio.get_running_loop()
    assert not j.due(loop.time() + 10)  # nothing open
    j.append(pt(1))
    t = loop.time()
    assert not j.due(t)
    assert j.due(t + 0.5)


async def test_run_sealer_seals_on_time(tmp_path: Path) -> None:
    j = make(tmp_path, flush_interval_s=0.02)
    acks = Acks()
    j.set_ack(acks)
    task = asyncio.create_task(j.run_sealer())
    try:
        j.append(pt(1), mid=1)
        seg = await asyncio.wait_for(j.next_segment(), 5)
        assert seg.points == 1
        assert acks.all == [1]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_next_segment_waits_for_a_seal(tmp_path: Path) -> None:
    j = make(tmp_path)
    waiter = asyncio.create_task(j.next_segment())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    j.append(pt(1))
    j.seal()
    seg = await asyncio.wait_for(waiter, 5)
    assert seg is j.segments[0]


async def test_done_deletes_oldest_segment(tmp_path: Path) -> None:
    j = make(tmp_path, batch_size=1)
    for i in range(3):
        j.append(pt(i))
    assert len(lp_files(tmp_path)) == 3
    first = j.segments[0]
    assert first.read() == pt(0)
    j.done(first)
    assert lp_files(tmp_path) == [f"{2:020d}.lp", f"{3:020d}.lp"]
    assert j.disk_bytes == len(pt(1)) + len(pt(2))
    assert j.pending_points == 2
    with pytest.raises(AssertionError):
        j.done(j.segments[1])  # only the oldest may be done


async def test_memory_bound_keeps_bytes_on_disk_only(tmp_path: Path) -> None:
    size = len(pt(1))
    j = make(tmp_path, batch_size=1, memory_bytes=2 * size)
    for i in range(1, 4):
        j.append(pt(i))
    assert [s.data is not None for s in j.segments] == [True, True, False]
    assert j.memory_used == 2 * size
    assert j.segments[2].read() == pt(3)  # read back from disk
    j.done(j.segments[0])
    assert j.memory_used == size
    j.done(j.segments[0])
    j.done(j.segments[0])
    assert j.memory_used == 0 and j.disk_bytes == 0


async def test_full_journal_refuses_to_seal_and_withholds_acks(tmp_path: Path) -> None:
    size = len(pt(1))
    j = make(tmp_path, batch_size=1000, max_bytes=2 * size)
    acks = Acks()
    j.set_ack(acks)
    j.append(pt(1), mid=1)
    j.append(pt(2), mid=2)
    assert j.seal()
    assert j.full
    j.append(pt(3), mid=3)
    assert not j.seal()  # full: stays open and unacknowledged, so the broker keeps the message
    assert acks.all == [1, 2]
    assert j.open_points == 1
    assert len(lp_files(tmp_path)) == 1
    # the writer frees space: the next seal goes through and acknowledges
    j.done(j.segments[0])
    assert not j.full
    assert j.seal()
    assert acks.all == [1, 2, 3]


async def test_full_journal_still_acks_batches_without_points(tmp_path: Path) -> None:
    j = make(tmp_path, max_bytes=1)
    acks = Acks()
    j.set_ack(acks)
    j.append(pt(1), mid=1)
    j.seal()
    assert j.full
    j.add_mid(9)
    assert j.seal()
    assert acks.all == [1, 9]


async def test_batch_size_seal_when_full_keeps_growing_the_open_batch(tmp_path: Path) -> None:
    j = make(tmp_path, batch_size=2, max_bytes=1)
    j.append(pt(0))
    j.append(pt(1))  # sealed: the journal was empty
    assert j.full
    for i in range(2, 6):
        assert j.append(pt(i))
    assert j.open_points == 4
    assert len(j.segments) == 1


async def test_qos0_dropped_only_when_full_and_open_batch_over_bound(tmp_path: Path) -> None:
    size = len(pt(1))
    j = make(tmp_path, max_bytes=1, memory_bytes=2 * size)
    j.append(pt(0))
    j.seal()
    assert j.full
    # open batch within its bound: QoS 0 still accepted
    assert j.append(pt(1), qos=0)
    assert j.append(pt(2), qos=0)
    assert j.append(pt(3), qos=0)  # size was exactly the bound, not over it
    assert j.dropped_qos0 == 0
    # now over the bound: QoS 0 dropped and counted, QoS 1 still kept (the broker's window limits it)
    assert not j.append(pt(4), qos=0)
    assert not j.append(pt(5), qos=0)
    assert j.dropped_qos0 == 2
    assert j.append(pt(6), mid=66, qos=1)
    assert j.open_points == 4


async def test_qos0_not_dropped_when_not_full(tmp_path: Path) -> None:
    j = make(tmp_path, memory_bytes=1)
    for i in range(10):
        assert j.append(pt(i), qos=0)
    assert j.dropped_qos0 == 0


async def test_recover_replays_segments_in_order_and_drops_tmp(tmp_path: Path) -> None:
    j = make(tmp_path, batch_size=2)
    for i in range(5):
        j.append(pt(i), mid=i + 1)
    # crash: the open batch (pt(4)) never reached disk and was never acknowledged
    (tmp_path / f"{3:020d}.tmp").write_bytes(b"half a write")
    del j

    j2 = make(tmp_path, batch_size=2)
    assert not files(tmp_path, "*.tmp")
    assert [s.seq for s in j2.segments] == [1, 2]
    assert [s.read() for s in j2.segments] == [pt(0) + pt(1), pt(2) + pt(3)]
    assert all(s.data is None and s.points == 2 for s in j2.segments)  # counted from the file
    assert j2.disk_bytes == sum(len(pt(i)) for i in range(4))
    assert j2.open_points == 0
    seg = await asyncio.wait_for(j2.next_segment(), 1)
    assert seg.seq == 1
    # new batches continue the numbering, after the replayed ones
    j2.append(pt(9))
    j2.seal()
    assert [s.seq for s in j2.segments] == [1, 2, 3]
    assert lp_files(tmp_path)[-1] == f"{3:020d}.lp"


async def test_recover_orders_numerically(tmp_path: Path) -> None:
    for seq in (10, 9, 100):
        (tmp_path / f"{seq:020d}.lp").write_bytes(pt(seq))
    j = make(tmp_path)
    assert [s.seq for s in j.segments] == [9, 10, 100]
    j.append(pt(1))
    j.seal()
    assert j.segments[-1].seq == 101


async def test_recover_counts_toward_full(tmp_path: Path) -> None:
    (tmp_path / f"{1:020d}.lp").write_bytes(b"x" * 100)
    j = make(tmp_path, max_bytes=100)
    assert j.full


async def test_recover_creates_missing_directory(tmp_path: Path) -> None:
    d = tmp_path / "a" / "b"
    j = make(d)
    assert d.is_dir() and not j.segments


async def test_fsync_path_writes_the_same_bytes(tmp_path: Path) -> None:
    j = make(tmp_path, fsync=True)
    j.append(pt(1))
    j.seal()
    assert (tmp_path / f"{1:020d}.lp").read_bytes() == pt(1)


async def test_a_batch_grown_while_full_is_sealed_as_batch_sized_segments(tmp_path: Path) -> None:
    j = make(tmp_path, batch_size=2, max_bytes=1)
    acks = Acks()
    j.set_ack(acks)
    j.append(pt(0), mid=1)
    j.append(pt(1), mid=2)  # sealed; now full
    for i in range(2, 7):
        j.append(pt(i), mid=i + 1)
    j.done(j.segments[0])  # the writer frees space
    assert j.seal()
    assert [s.points for s in j.segments] == [2, 2, 1]  # never a write larger than a normal batch
    assert b"".join(s.read() for s in j.segments) == b"".join(pt(i) for i in range(2, 7))
    assert acks.all == [1, 2, 3, 4, 5, 6, 7]


async def test_a_disk_error_keeps_the_batch_open_and_unacknowledged(tmp_path: Path) -> None:
    d = tmp_path / "journal"
    j = make(d)
    acks = Acks()
    j.set_ack(acks)
    j.append(pt(1), mid=1)
    d.rmdir()
    d.write_text("")  # the journal's directory is now a file: every write fails, as on a broken disk
    assert not j.seal()
    assert j.open_points == 1 and acks.all == [] and j.write_errors == 1
    d.unlink()
    d.mkdir()
    assert not files(d, "*.tmp")
    assert j.seal()  # the disk is back: the same batch goes out, numbered as if nothing happened
    assert acks.all == [1] and lp_files(d) == [f"{1:020d}.lp"]


async def test_a_stray_file_in_the_journal_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "notes.lp").write_text("hello")
    j = make(tmp_path)
    assert list(j.segments) == []


async def test_a_full_receive_window_seals_at_once(tmp_path: Path) -> None:
    # The broker sends no more than the window before our acks: waiting for the flush interval would idle.
    j = make(tmp_path / "j", batch_size=1000, window=3)
    acks = Acks()
    j.set_ack(acks)
    j.append(pt(1), mid=1)
    j.append(pt(2), mid=0, qos=0)  # QoS 0 takes no place in the window
    j.add_mid(2)
    assert acks.all == [] and j.open_points == 2
    j.append(pt(3), mid=3)
    j.append(pt(4), mid=4)  # the rest of what one read of the socket brought joins the batch
    assert acks.all == []
    await asyncio.sleep(0)
    assert acks.all == [1, 2, 3, 4] and j.open_points == 0
    assert len(j.segments) == 1


async def test_a_stream_stalled_on_our_acks_is_sealed_at_once(tmp_path: Path) -> None:
    # A broker that caps what it sends below our window (EMQX sends 32 at most) stops and waits for acks.
    from gateway.ingest.journal import STALL_MIN, STALL_S

    j = make(tmp_path / "j", batch_size=1000, window=20000, flush_interval_s=60.0)
    acks = Acks()
    j.set_ack(acks)
    for i in range(STALL_MIN - 1):
        j.append(pt(i), mid=i + 1)
    await asyncio.sleep(STALL_S * 4)
    assert acks.all == []  # a trickle below the minimum waits for the flush interval
    for i in range(STALL_MIN - 1, 32):
        j.append(pt(i), mid=i + 1)
    await asyncio.sleep(STALL_S / 5)
    j.append(pt(40), mid=41)  # still coming: no seal yet
    assert acks.all == []
    await asyncio.sleep(STALL_S * 4)
    assert len(acks.all) == 33 and j.open_points == 0
