"""The seekable member reader (``bucketsnap._frame_reader``): each zstd block type decoded as zstd decodes it,
every corrupted or truncated frame refused naming the member, units decoded on several threads handed over in
order, and the read-ahead bounded."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from typing import Any

import pytest
import torch
import zstandard

from bucketsnap import BucketsnapError, CorruptSnapshotError, SnapshotStore, _frames
from bucketsnap._frame_reader import FramesReader, read_payload, units
from bucketsnap._prefault import prefault
from bucketsnap._zipformat import READ_AHEAD, READ_CHUNK, ReadRange

_MAGIC = struct.pack("<I", 0xFD2FB528)


def _block(kind: int, size: int, body: bytes, last: bool) -> bytes:
    return ((size << 3) | (kind << 1) | int(last)).to_bytes(3, "little") + body


def raw_frame(data: bytes, *, block: int = 128 * 1024, single_segment: bool = False) -> bytes:
    """A frame of raw blocks of ``block`` bytes (no checksum), its content size in 8 bytes or, single-segment,
    in the fewest the format allows."""
    if single_segment:
        size = len(data)
        fcs = (0, size.to_bytes(1, "little")) if size < 256 else (1, (size - 256).to_bytes(2, "little"))
        head = _MAGIC + bytes([fcs[0] << 6 | 0x20]) + fcs[1]
    else:
        head = _MAGIC + bytes([0xC0, 0x38]) + struct.pack("<Q", len(data))
    blocks = [data[i : i + block] for i in range(0, len(data), block)] or [b""]
    return head + b"".join(_block(0, len(b), b, i == len(blocks) - 1) for i, b in enumerate(blocks))


def rle_frame(byte: int, counts: list[int]) -> bytes:
    """A frame of RLE blocks: ``byte`` repeated ``counts[i]`` times in block i."""
    head = _MAGIC + bytes([0xC0, 0x38]) + struct.pack("<Q", sum(counts))
    return head + b"".join(_block(1, n, bytes([byte]), i == len(counts) - 1) for i, n in enumerate(counts))


def mixed_frame() -> tuple[bytes, bytes]:
    """A frame of a raw block, an RLE block and a raw block (no checksum), and its content."""
    a, b = os.urandom(1000), os.urandom(77)
    content = a + b"\x07" * 5000 + b
    head = _MAGIC + bytes([0xC0, 0x38]) + struct.pack("<Q", len(content))
    return head + _block(0, 1000, a, False) + _block(1, 5000, b"\x07", False) + _block(0, 77, b, True), content


def member(frames: list[tuple[bytes, int]]) -> tuple[bytes, _frames.FrameIndex]:
    """The data of a seekable member holding ``frames`` (stored bytes, raw size), and its index."""
    entries = b"".join(struct.pack("<3L", len(f), raw, zlib.crc32(f)) for f, raw in frames)
    body = entries + struct.pack("<L4s", len(frames), b"BSFX")
    data = b"".join(f for f, _ in frames) + struct.pack("<2L", 0x184D2A5B, len(body)) + body
    raw_size = sum(raw for _, raw in frames)
    index = _frames.read_index(lambda s, e: data[s:e], 0, len(data), raw_size, where="m")
    return data, index


def read_all(data: bytes, index: _frames.FrameIndex, **kw: object) -> bytes:
    return read_payload(lambda s, e: data[s:e], 0, index, 0, index.raw_starts[-1] + index.raw_sizes[-1], where="m")


def zstd_reads(data: bytes) -> bytes:
    """What zstd's own decoder reads from the member: its frames in sequence, the index skipped."""
    return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True).read()


COMPRESSIBLE = bytes(range(256)) * 40 + b"tail"
RANDOM = os.urandom(300_000)


def frame_cases() -> dict[str, tuple[bytes, bytes]]:
    """name -> (one frame, its content): every block type, header layout and checksum case."""
    mixed, mixed_content = mixed_frame()
    cases = {
        "stored by bucketsnap": (b"".join(bytes(p) for p in _frames._stored([memoryview(RANDOM)])), RANDOM),
        "raw, small blocks": (raw_frame(RANDOM[:1000], block=300), RANDOM[:1000]),
        "raw, single segment, 1-byte size": (raw_frame(RANDOM[:200], single_segment=True), RANDOM[:200]),
        "raw, single segment, 2-byte size": (raw_frame(RANDOM[:3000], single_segment=True), RANDOM[:3000]),
        "rle": (rle_frame(0xAB, [131072, 131072, 17]), b"\xab" * (2 * 131072 + 17)),
        "raw, rle and raw blocks": (mixed, mixed_content),
        "compressed, checksum": (zstandard.ZstdCompressor(write_checksum=True).compress(COMPRESSIBLE), COMPRESSIBLE),
        "compressed, no checksum": (zstandard.ZstdCompressor().compress(COMPRESSIBLE), COMPRESSIBLE),
        "raw blocks by zstd, checksum": (zstandard.ZstdCompressor(write_checksum=True).compress(RANDOM), RANDOM),
        "empty": (raw_frame(b""), b""),
    }
    return cases


@pytest.mark.parametrize("case", sorted(frame_cases()))
def test_each_kind_of_frame_reads_as_zstd_reads_it(case: str) -> None:
    frame, content = frame_cases()[case]
    data, index = member([(raw_frame(b"head"), 4), (frame, len(content)), (raw_frame(b"end"), 3)])
    assert zstd_reads(data) == b"head" + content + b"end"
    assert read_all(data, index) == b"head" + content + b"end"
    # any range of it, as Snapshot.tensor reads one
    whole = b"head" + content + b"end"
    for start, end in [(2, 9), (4, 4 + len(content)), (5, 7 + len(content)), (0, 1), (len(whole) - 2, len(whole))]:
        end = min(end, len(whole))
        got = read_payload(lambda s, e: data[s:e], 0, index, start, end, where="m")
        assert got == whole[start:end]


@pytest.mark.parametrize("case", sorted(frame_cases()))
def test_every_flipped_byte_of_a_frame_is_refused_naming_the_member(case: str) -> None:
    frame, content = frame_cases()[case]
    data, index = member([(raw_frame(b"head"), 4), (frame, len(content))])
    start = index.stored_starts[1]
    step = max(1, len(frame) // 3000)  # every byte of small frames, evenly spread ones of large frames
    for pos in [*range(start, start + min(len(frame), 64)), *range(start, start + len(frame), step)]:
        flipped = bytearray(data)
        flipped[pos] ^= 0x01
        with pytest.raises(CorruptSnapshotError, match=r"^m frame 1: checksum mismatch"):
            read_all(bytes(flipped), index)


@pytest.mark.parametrize("case", sorted(frame_cases()))
def test_a_frame_corrupt_under_a_matching_crc_is_refused_or_read_at_its_size(case: str) -> None:
    """A writer that wrote a bad frame and its CRC: the parser and zstd's checks must still refuse a malformed
    header or block (never crash, hang or return a different number of bytes); a checksummed frame's content
    must come back intact or be refused."""
    frame, content = frame_cases()[case]
    checksummed = frame[4] & 0x04
    for pos in range(min(len(frame), 40)):
        for mask in (0xFF, 0x01, 0x80):
            bad = bytearray(frame)
            bad[pos] ^= mask
            data, index = member([(bytes(bad), len(content))])
            try:
                out = read_all(data, index)
            except CorruptSnapshotError as exc:
                assert str(exc).startswith("m frame 0: "), exc
                continue
            assert len(out) == len(content), (pos, mask)
            if checksummed:
                assert out == content, (pos, mask)


def test_a_frame_cut_short_or_with_bytes_after_it_is_refused() -> None:
    frame = raw_frame(RANDOM[:5000], block=1000)
    for bad, match in [
        (frame[:-1], "truncated zstd frame"),
        (frame[:-1000], "truncated zstd frame"),
        (frame[:20], "truncated zstd frame"),
        (frame + b"\x00", "ends at byte"),
        (frame[:4], "not a zstd frame"),
        (raw_frame(RANDOM[:5000], block=4000, single_segment=True)[:-4005], "truncated zstd frame"),
    ]:
        data, index = member([(bad, 5000)])
        with pytest.raises(CorruptSnapshotError, match=match):
            read_all(data, index)
    # sizes that lie: the frame's content size against the index's, the blocks' sum against both
    data, index = member([(frame, 4999)])
    with pytest.raises(CorruptSnapshotError, match="differs from the index's 4999"):
        read_all(data, index)
    short = _MAGIC + bytes([0xC0, 0x38]) + struct.pack("<Q", 5001) + frame[14:]
    data, index = member([(short, 5001)])
    with pytest.raises(CorruptSnapshotError, match="decompresses to 5000 bytes, not 5001"):
        read_all(data, index)
    oversized = raw_frame(RANDOM[:200_000], block=200_000)  # blocks hold at most 128 KiB: zstd refuses it too
    with pytest.raises(zstandard.ZstdError):
        zstd_reads(oversized)
    data, index = member([(oversized, 200_000)])
    with pytest.raises(CorruptSnapshotError, match="corrupt zstd block"):
        read_all(data, index)
    bomb = rle_frame(0, [131072] * 64)  # 8 MiB from a few hundred bytes, declared as 1 KiB
    bomb = _MAGIC + bytes([0xC0, 0x38]) + struct.pack("<Q", 1024) + bomb[14:]
    data, index = member([(bomb, 1024)])
    with pytest.raises(CorruptSnapshotError, match="more than the index's 1024"):
        read_all(data, index)


def test_a_short_read_is_a_truncated_member() -> None:
    data, index = member([(raw_frame(RANDOM[:5000]), 5000), (raw_frame(RANDOM[:700]), 700)])
    with pytest.raises(CorruptSnapshotError, match=r"^m: truncated: wanted bytes"):
        read_payload(lambda s, e: data[s : e - 1], 0, index, 0, 5700, where="m")


def big_member(frames: int) -> tuple[bytes, _frames.FrameIndex, bytes]:
    content = os.urandom(frames * _frames.FRAME_SIZE)
    parts = [memoryview(content)[i : i + _frames.FRAME_SIZE] for i in range(0, len(content), _frames.FRAME_SIZE)]
    data, index = member([(b"".join(bytes(p) for p in _frames._stored([p])), p.nbytes) for p in parts])
    return data, index, content


def test_units_decoded_on_several_threads_come_back_in_order() -> None:
    data, index, content = big_member(40)
    assert [len(u) for u in units(index, range(40))] == [4] * 10  # 4 raw frames of 1 MiB: one request
    threads: set[int] = set()
    in_flight = peak = 0
    lock = threading.Lock()

    def read_range(start: int, end: int) -> bytes:
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
            threads.add(threading.get_ident())
        time.sleep(0.02 * (1 - start / len(data)))  # the earlier the unit, the later it arrives
        with lock:
            in_flight -= 1
        return data[start:end]

    assert read_payload(read_range, 0, index, 0, len(content), where="m") == content
    assert peak > 1 and len(threads) > 1, (peak, len(threads))
    assert peak <= READ_AHEAD


def test_the_read_ahead_holds_at_most_read_ahead_units_beyond_what_was_consumed() -> None:
    data, index, content = big_member(48)
    requested = consumed = worst = 0
    lock = threading.Lock()

    def read_range(start: int, end: int) -> bytes:
        nonlocal requested, worst
        with lock:
            requested += end - start
            worst = max(worst, requested - consumed)
        return data[start:end]

    unit = READ_CHUNK + READ_CHUNK // 64
    out = bytearray()
    with FramesReader(read_range, 0, index, 0, len(content), where="m") as reader:
        buffer = bytearray(300_000)  # a slow consumer, in small reads
        while n := reader.readinto(buffer):
            out += buffer[:n]
            consumed += n
            time.sleep(0.0005)
    assert bytes(out) == content
    assert worst <= (READ_AHEAD + 1) * unit, worst / unit


def test_a_whole_member_checks_its_index_against_the_members_crc_before_reading_a_frame(tmp_path: object) -> None:
    store = SnapshotStore("memory://frame-reader-index")
    store.save(1, {"w": torch.arange(3 * 2**20, dtype=torch.float32)})  # 12 MiB: stored frames
    info = store.info(1)
    member_info = info.members["w"]
    archive = bytearray(store.storage.read(info.path))
    end = member_info.offset + member_info.stored_size
    entries_end = end - 8
    archive[entries_end - 1] ^= 0x01  # the last frame's CRC-32 in the index
    store.storage.backend.fs.pipe_file(store.storage.path(info.path), bytes(archive))
    reader = SnapshotStore("memory://frame-reader-index")
    with pytest.raises(CorruptSnapshotError, match=r"member w\.zst: checksum mismatch .* of the frame index"):
        reader.load(1)
    assert reader.storage.read_requests <= 3, "read a frame before checking the index"  # manifest, index


def test_a_restore_from_memory_equals_what_was_saved_whatever_the_layout() -> None:
    store = SnapshotStore("memory://frame-reader-layouts")
    state = {
        "raw": {"a": torch.randn(700_001), "b": torch.randn(5), "c": torch.randn(2**20 + 3)},
        "compressed": {"z": torch.zeros(3_000_000), "r": torch.arange(1_000_000) % 7},
        "mixed": [torch.randn(10), torch.zeros(2**20), b"bytes", {"n": 3}],
    }
    store.save(1, state)
    got = SnapshotStore("memory://frame-reader-layouts").load(1)
    assert all(torch.equal(got["raw"][k], v) for k, v in state["raw"].items())
    assert all(torch.equal(got["compressed"][k], v) for k, v in state["compressed"].items())
    assert torch.equal(got["mixed"][0], state["mixed"][0]) and torch.equal(got["mixed"][1], state["mixed"][1])
    assert got["mixed"][2:] == state["mixed"][2:]
    SnapshotStore("memory://frame-reader-layouts").verify(1)


@pytest.mark.parametrize("background", [False, True])
def test_prefaulting_a_buffer_keeps_what_it_holds(background: bool) -> None:
    buffer = bytearray(os.urandom(9 * 2**20 + 123))
    before = bytes(buffer)
    done = threading.Event()

    def submit(fn: object) -> None:
        def run() -> None:
            fn()  # type: ignore[operator]
            done.set()

        threading.Thread(target=run).start()

    view = memoryview(buffer)[5:]
    prefault(view, background=submit if background else None)
    if background:
        assert done.wait(10)
    assert bytes(buffer) == before
    prefault(memoryview(bytes(10 * 2**20)))  # read-only: left alone


def allocations(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every bytearray the frame reader allocates from now on, in order."""
    from bucketsnap import _frame_reader

    allocated: list[int] = []

    def counting_bytearray(*args: object) -> bytearray:
        out = bytearray(*args)  # type: ignore[call-overload]
        allocated.append(len(out))
        return out

    monkeypatch.setattr(_frame_reader, "bytearray", counting_bytearray, raising=False)
    return allocated


def test_compressed_frames_of_several_units_decode_into_reused_buffers_and_keep_their_checks() -> None:
    """Past the first unit, compressed frames are decoded into buffers handed back by earlier units: the bytes
    come back in order, and a frame whose content checksum fails is refused there too."""
    contents = [bytes([i]) * 1000 + os.urandom(24) + bytes(range(256)) * 4000 for i in range(40)]
    frames = [zstandard.ZstdCompressor(write_checksum=True).compress(c) for c in contents]
    data, index = member([(f, len(c)) for f, c in zip(frames, contents, strict=True)])
    assert len(list(units(index, range(40)))) > READ_AHEAD + 1  # buffers get reused
    assert read_all(data, index) == b"".join(contents)
    bad = bytearray(frames[30])
    bad[-1] ^= 0x01  # its content checksum
    frames[30] = bytes(bad)
    data, index = member([(f, len(c)) for f, c in zip(frames, contents, strict=True)])
    with pytest.raises(CorruptSnapshotError, match=r"m frame 30: corrupt zstd data: .*checksum"):
        read_all(data, index)


def test_a_compressed_member_decodes_into_at_most_read_ahead_plus_one_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    from bucketsnap import _frame_reader

    contents = [bytes([i % 256]) * _frames.FRAME_SIZE for i in range(64)]  # 16 units of 4 compressed frames
    frames = [zstandard.ZstdCompressor(write_checksum=True).compress(c) for c in contents]
    data, index = member([(f, len(c)) for f, c in zip(frames, contents, strict=True)])
    allocated = allocations(monkeypatch)
    with FramesReader(lambda s, e: data[s:e], 0, index, 0, 64 * _frames.FRAME_SIZE, where="m") as reader:
        out = bytearray(64 * _frames.FRAME_SIZE)
        assert reader.readinto(out) == len(out)
    assert bytes(out) == b"".join(contents)
    assert 1 <= len(allocated) <= READ_AHEAD + 1, allocated
    assert max(allocated) == _frame_reader._UNIT_STORED  # a unit's raw bytes, or its stored bytes and headers


def test_a_frame_stored_larger_than_zstd_ever_writes_is_refused_unread() -> None:
    """docs/security.md: every size is checked before allocating or reading. A valid frame of megabytes of empty
    raw blocks before one byte (a matching CRC; bucketsnap never writes one) was fetched whole and its block
    headers walked one by one, 0.15-0.2 s of CPU per MiB (found by review): its index entry is refused first."""
    frame = (
        struct.pack("<IBBQ", 0xFD2FB528, 0xC0, 0x38, 1) + b"\x00\x00\x00" * 2**20 + ((1 << 3) | 1).to_bytes(3, "little")
    )
    frame += b"Z"
    body = struct.pack("<3L", len(frame), 1, zlib.crc32(frame)) + struct.pack("<L4s", 1, b"BSFX")
    data = frame + struct.pack("<2L", 0x184D2A5B, len(body)) + body
    reads: list[tuple[int, int]] = []

    def read_range(start: int, end: int) -> bytes:
        reads.append((start, end))
        return data[start:end]

    with pytest.raises(CorruptSnapshotError, match=r"m: frame index: frame 0 stores \d+ bytes for 1"):
        _frames.read_index(read_range, 0, len(data), 1, where="m")
    assert all(start >= len(frame) - 32 * 2**10 for start, _ in reads)  # the index's tail only
    for raw in (0, 1, 2**10, 128 * 2**10, 2**20, _frames.MAX_FRAME):  # what zstd writes at worst stays under it
        incompressible = os.urandom(raw)
        for level in (1, 3):
            assert len(zstandard.ZstdCompressor(level=level, write_checksum=True).compress(incompressible)) <= (
                _frames.stored_bound(raw)
            )


@pytest.fixture(autouse=True)
def no_kept_buffers() -> None:
    """Each test starts with no unit buffers kept from an earlier reader (they would be allocated 0 times)."""
    from bucketsnap import _frame_reader

    _frame_reader._SPARES.drop()


def reads_into_a_buffer(data: bytes, calls: list[tuple[int, int]]) -> ReadRange:
    """Ranged reads of ``data`` that also read into a caller's buffer, as a store's do (Storage.read_into)."""

    def read(start: int, end: int) -> bytes:
        return data[start:end]

    def into(start: int, buffer: memoryview) -> int:
        piece = data[start : start + buffer.nbytes]
        buffer[: len(piece)] = piece
        calls.append((start, len(piece)))
        return len(piece)

    read.into = into  # type: ignore[attr-defined]
    return read


def test_raw_units_are_read_into_at_most_read_ahead_plus_one_reused_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/performance.md: a unit of raw frames is read into one of at most READ_AHEAD + 1 buffers the reader
    reuses, not into new bytes per request; its frames are then copied out of it, checked as before."""

    data, index, content = big_member(64)  # 16 units of 4 raw frames
    allocated = allocations(monkeypatch)
    calls: list[tuple[int, int]] = []
    out = memoryview(torch.empty(len(content), dtype=torch.uint8).numpy())
    with FramesReader(reads_into_a_buffer(data, calls), 0, index, 0, len(content), where="m") as reader:
        assert reader.readinto(out) == len(content)
    assert out.tobytes() == content
    assert len(calls) == 16  # every unit, each one request
    assert 1 <= len(allocated) <= READ_AHEAD + 1, allocated


def test_a_unit_read_into_a_buffer_keeps_every_check() -> None:
    """Each frame of a unit read into a reused buffer is still checked against its CRC-32 (a flipped byte of any
    unit, in a frame header, a block header or the data, is refused naming its frame), a short read is a
    truncated member, and any range reads exactly."""
    data, index, content = big_member(12)  # 3 units
    for frame in (0, 5, 11):
        start = index.stored_starts[frame]
        for pos in (start, start + 4, start + 14, start + 3 + 131072 + 14, start + index.stored_sizes[frame] - 1):
            flipped = bytearray(data)
            flipped[pos] ^= 0x01
            with pytest.raises(CorruptSnapshotError, match=rf"^m frame {frame}: checksum mismatch"):
                read_payload(reads_into_a_buffer(bytes(flipped), []), 0, index, 0, len(content), where="m")

    def short(start: int, end: int) -> bytes:
        return data[start:end]

    def into_short(start: int, buffer: memoryview) -> int:
        piece = data[start : start + buffer.nbytes - 1]
        buffer[: len(piece)] = piece
        return len(piece)

    short.into = into_short  # type: ignore[attr-defined]
    with pytest.raises(CorruptSnapshotError, match=r"^m: truncated: wanted bytes"):
        read_payload(short, 0, index, 0, len(content), where="m")
    mib = _frames.FRAME_SIZE
    for lo, hi in [(0, len(content)), (1, 9 * mib + 5), (4 * mib - 1, 8 * mib + 1), (3, 4), (11 * mib, 12 * mib)]:
        calls: list[tuple[int, int]] = []
        assert read_payload(reads_into_a_buffer(data, calls), 0, index, lo, hi, where="m") == content[lo:hi]


def test_a_restore_reads_raw_units_into_the_readers_buffers_through_the_storage(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A store's restore reads a raw member's units with Storage.read_into (S3 and GCS copy the response's
    pieces straight into the buffer), and returns what was saved."""
    from bucketsnap._storage import Storage

    counted: list[int] = []
    read_into = Storage.read_into

    def counting(self: Storage, rel: str, start: int, buffer: object) -> int:
        got = read_into(self, rel, start, buffer)
        counted.append(got)
        return got

    monkeypatch.setattr(Storage, "read_into", counting)
    url = f"memory://into-{os.urandom(4).hex()}/run"
    weights = torch.randn(5_000_000)  # 20 MB of random floats: stored raw
    SnapshotStore(url).save(1, {"w": weights, "step": 3})
    loaded = SnapshotStore(url).load(1)
    assert torch.equal(loaded["w"], weights) and loaded["step"] == 3
    assert sum(counted) >= 0.99 * weights.numel() * 4  # all but the last frames, partly in the index read


def test_the_next_reader_reuses_the_buffers_a_closed_one_freed_and_an_idle_process_keeps_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """docs/performance.md: a closed reader's unit buffers serve the next reader (the next member, the next
    restore) instead of new memory; at most READ_AHEAD + 1 are kept, and none once KEEP_S seconds pass unused."""
    from bucketsnap import _frame_reader

    data, index, content = big_member(64)
    allocated = allocations(monkeypatch)
    out = bytearray(len(content))
    for _ in range(3):  # three restores of the member, one after the other
        with FramesReader(reads_into_a_buffer(data, []), 0, index, 0, len(content), where="m") as reader:
            assert reader.readinto(out) == len(content)
        assert out == content
    assert 1 <= len(allocated) <= READ_AHEAD + 1, allocated  # all three together
    kept = _frame_reader._SPARES
    assert 0 < kept.held() <= (READ_AHEAD + 1) * _frame_reader._UNIT_STORED
    assert kept._timer is not None and kept._timer.daemon  # armed: it calls expire() KEEP_S seconds from now
    kept.expire()  # the timer's call before KEEP_S idle seconds: kept for the next reader
    assert kept.held() > 0
    monkeypatch.setattr(_frame_reader, "KEEP_S", 0.0)
    kept.expire()  # idle for KEEP_S: dropped
    assert kept.held() == 0


def test_a_reader_closed_with_units_in_flight_keeps_none_of_their_buffers_for_the_next() -> None:
    """A unit still being fetched when its reader is closed goes on writing into its buffer: that buffer must
    never serve the next reader (its late bytes would land in another restore's unit)."""
    from bucketsnap import _frame_reader

    data, index, content = big_member(64)
    gate = threading.Event()
    late: list[int] = []

    def slow(start: int, end: int) -> bytes:
        return data[start:end]

    def slow_into(start: int, buffer: memoryview) -> int:
        if start > 0:  # every unit but the first waits, then its answer lands late, and differs
            gate.wait(30)
            buffer[:] = b"\xff" * buffer.nbytes
            late.append(start)
            return buffer.nbytes
        piece = data[start : start + buffer.nbytes]
        buffer[: len(piece)] = piece
        return len(piece)

    slow.into = slow_into  # type: ignore[attr-defined]
    reader = FramesReader(slow, 0, index, 0, len(content), where="m")
    first = bytearray(1000)
    assert reader.readinto(first) == 1000 and first == content[:1000]
    in_flight = [out for _, out in reader._pending if out is not None]
    assert in_flight
    reader.close()
    kept = _frame_reader._SPARES._buffers
    assert kept and not any(k is b for k in kept for b in in_flight)
    gate.set()
    again = bytearray(len(content))
    with FramesReader(reads_into_a_buffer(data, []), 0, index, 0, len(content), where="m") as second:
        assert second.readinto(again) == len(content)
    assert again == content


def test_at_most_read_ahead_plus_one_freed_buffers_are_kept() -> None:
    from bucketsnap import _frame_reader

    kept = _frame_reader._SPARES
    kept.give([bytearray(_frame_reader._UNIT_STORED) for _ in range(3 * READ_AHEAD)])
    assert kept.held() == (READ_AHEAD + 1) * _frame_reader._UNIT_STORED
    kept.drop()
    assert kept.held() == 0


_LEFT_OPEN = """
import sys, torch
from bucketsnap import SnapshotStore, _archive
from bucketsnap._frame_reader import FramesReader
from bucketsnap._tensors import read_layout

store = SnapshotStore(sys.argv[1])
snap = store.open(1)
member = snap.info.members["w"]
read_range = snap._reader(member)
stream = _archive._frames_stream(read_range, member, "m")  # a restore abandoned inside its member's stream
stream.__enter__().read(10)
index = read_layout(read_range, member, where="m").index
left = FramesReader(read_range, member.offset, index, 0, member.raw_size, where="m")
left.read(10)  # a reader never closed: its finalizer closes it
print("left open", flush=True)
"""


def test_a_process_exits_with_readers_left_open(tmp_path: Any) -> None:
    """A reader still open when the interpreter exits (a restore abandoned mid-member, a reader never closed) is
    closed as Python finalizes it; the process exits at once. Keeping its buffers started a timer thread there,
    whose start() waited forever: the process hung at exit."""
    url = str(tmp_path / "run")
    SnapshotStore(url).save(1, {"w": torch.randn(8 * 2**20 // 4)})
    done = subprocess.run([sys.executable, "-c", _LEFT_OPEN, url], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "left open" in done.stdout


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("size", [1, 1000, READ_CHUNK - 1, READ_CHUNK, READ_CHUNK + 1, 3 * READ_CHUNK + 5, 1 << 30])
def test_buffers_of_any_size_from_any_start_get_the_members_bytes(size: int, compressed: bool) -> None:
    """readinto fills buffers of any size, from any start, with the member's bytes, units read ahead or not."""
    if compressed:
        content = bytes(range(256)) * (40 * _frames.FRAME_SIZE // 256)
        parts = [content[i : i + _frames.FRAME_SIZE] for i in range(0, len(content), _frames.FRAME_SIZE)]
        data, index = member([(zstandard.ZstdCompressor().compress(p), len(p)) for p in parts])
    else:
        data, index, content = big_member(40)
    for start in (0, 12_345, 2 * READ_CHUNK):
        end = start + 10_000 if size < 4096 else len(content)  # small buffers: a few thousand reads
        out = bytearray()
        with FramesReader(reads_into_a_buffer(data, []), 0, index, start, end, where="m") as reader:
            buffer = bytearray(min(size, len(content)))
            while got := reader.readinto(buffer):
                out += buffer[:got]
        assert out == content[start:end], (start, size)


@pytest.mark.parametrize("fetched_ahead", [False, True])
def test_no_pool_thread_writes_into_the_callers_buffer_once_readinto_has_raised(fetched_ahead: bool) -> None:
    """docs: the caller may free its buffer once readinto returns or raises. A corrupt unit fails the read while
    later units bound for the same buffer are still being fetched (``fetched_ahead``: asked for before the
    buffer was given, by a read of the first bytes): none of them writes into it afterwards."""
    data, index, content = big_member(40)
    bad = bytearray(data)
    bad[index.stored_starts[4] + 100] ^= 0xFF  # the second unit's first frame
    release = threading.Event()
    started: list[int] = []

    def read(start: int, end: int) -> bytes:
        return bytes(bad[start:end])

    def into(start: int, buffer: memoryview) -> int:
        if start > index.stored_starts[4]:  # the units after the corrupt one arrive late
            started.append(start)
            release.wait(5)
        buffer[:] = bad[start : start + buffer.nbytes]
        return buffer.nbytes

    read.into = into  # type: ignore[attr-defined]
    out = bytearray(len(content))
    with FramesReader(read, 0, index, 0, len(content), where="m") as reader:
        if fetched_ahead:
            first = bytearray(1000)
            assert reader.readinto(first) == 1000 and first == content[:1000]
        timer = threading.Timer(0.5, release.set)
        timer.start()
        with pytest.raises(CorruptSnapshotError, match="frame 4: checksum mismatch"):
            reader.readinto(out)
        after = bytes(out)
        assert started  # late units were in flight when it raised
        release.set()
        time.sleep(0.3)
        assert bytes(out) == after, "a pool thread wrote into the buffer after readinto raised"
        timer.cancel()


def test_a_ctrl_c_while_readinto_waits_leaves_no_copy_writing_into_the_buffer_and_the_reader_refuses_more() -> None:
    """A KeyboardInterrupt that lands while readinto waits for a unit: once readinto raised, nothing writes into
    the caller's buffer (a design that copied units into it on the read pool did, found by review), and the
    reader, which lost the unit it was waiting for, refuses to read on rather than return the bytes after it."""
    import signal

    data, index, content = big_member(40)
    release = threading.Event()

    def read(start: int, end: int) -> bytes:
        return data[start:end]

    def into(start: int, buffer: memoryview) -> int:
        if start == 0:  # the first unit arrives late: readinto is waiting for it when the interrupt lands
            release.wait(10)
        buffer[:] = data[start : start + buffer.nbytes]
        return buffer.nbytes

    read.into = into  # type: ignore[attr-defined]
    out = bytearray(len(content))
    main = threading.main_thread().ident
    assert main is not None and threading.get_ident() == main
    timer = threading.Timer(0.3, lambda: signal.pthread_kill(main, signal.SIGINT))
    with FramesReader(read, 0, index, 0, len(content), where="m") as reader:
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            reader.readinto(out)
        after = bytes(out)
        release.set()
        time.sleep(0.3)
        assert bytes(out) == after, "a pool thread wrote into the buffer after readinto raised"
        with pytest.raises(BucketsnapError, match="an earlier read of this member failed"):
            reader.readinto(out)


_INTERRUPTED = """
import signal, sys, threading, time
import torch
from bucketsnap import SnapshotStore
from bucketsnap._storage import Storage

store = SnapshotStore(sys.argv[1])
read_into = Storage.read_into

def slow(self, rel, start, buffer):
    if rel.startswith("snapshots/") and 40 * 2**20 < start <= 44 * 2**20 + 4096:
        time.sleep(2.0)  # a unit inside the tensor is late: the restore waits for it
    return read_into(self, rel, start, buffer)

Storage.read_into = slow
main = threading.main_thread().ident
threading.Timer(0.8, lambda: signal.pthread_kill(main, signal.SIGINT)).start()
try:
    store.load(1)
except KeyboardInterrupt:
    print("interrupted", flush=True)
reused = [bytearray(64 * 2**20 + 4096) for _ in range(2)]  # memory likely mapped where the tensor was
time.sleep(3)  # the units in flight end meanwhile
written = any(v[i : i + 2**20].count(0) != 2**20 for v in reused for i in range(0, len(v) - 2**20, 2**20))
print("overwritten" if written else "intact")
"""


def test_a_restore_interrupted_by_ctrl_c_writes_nothing_after_it_raised(tmp_path: Any) -> None:
    """SnapshotStore.load interrupted by Ctrl-C frees the tensor it was filling as KeyboardInterrupt propagates;
    no unit still in flight may write into it then (with units copied on the read pool, the process died with
    SIGSEGV: found by review)."""
    url = str(tmp_path / "run")
    SnapshotStore(url).save(1, {"x": torch.randn(16 * 2**20)})  # 64 MiB of raw frames: 16 units
    done = subprocess.run([sys.executable, "-c", _INTERRUPTED, url], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.split() == ["interrupted", "intact"], done.stdout
