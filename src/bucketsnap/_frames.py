"""Seekable members: a member's payload as independent zstd frames of bounded size, with a frame index.

A member written with codec ``"zstd-frames"`` holds, in its zip entry's data::

    frame 0          the payload's magic, header length and JSON header (the tree), alone
    frame 1 ... n-1  the data, cut into frames of at most FRAME_SIZE (1 MiB) uncompressed bytes; a buffer of
                     ALIGN (64 KiB) or more starts a new frame and ends its last one, so a tensor's bytes are
                     exactly the frames it spans; smaller buffers share frames with their neighbours
    index            a zstd skippable frame (magic 0x184D2A5B): per frame its stored size, raw size and the
                     CRC-32 of its stored bytes (three u32), then the frame count (u32) and b"BSFX"

Every frame is a complete zstd frame with its content size: compressed (with zstd's content checksum) or, for
incompressible members, raw blocks (``_StoredFrame``'s layout, without copying the caller's buffers). Any zstd
decoder reads the frames in sequence and skips the index, so ``unzip -p snap.zip policy.zst | zstd -d`` still
recovers the payload by hand. zstd's seekable format (contrib/seekable_format) is the model; the index is our
own because its checksums are CRC-32, which the zip writer computes anyway, of the stored bytes, so that raw
frames are covered too (the seekable format's optional checksum is XXH64 of the decompressed bytes).

Trade-off: independent frames of 1 MiB compress a few percent worse than one long frame, and the index costs
12 bytes per MiB. In exchange a reader locates any byte range of the payload from the member's last 64 KiB
(the index, for members up to ~5 GiB; larger ones need one more read of the rest of it) and decompresses only
the frames that hold it, each checked against its CRC-32 before it is decoded; a save holds one frame per
compression thread, a restore at most 9 units of frames (:mod:`bucketsnap._frame_reader`), never the member.
"""

from __future__ import annotations

import bisect
import os
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import zstandard

from bucketsnap._pools import Pool
from bucketsnap._zipformat import MemberSink, ReadRange, crc32, crc32_combine
from bucketsnap.errors import CorruptSnapshotError

__all__ = ["ALIGN", "CODEC", "FRAME_SIZE", "FrameIndex", "member_crc", "read_index", "write_frames"]

CODEC = "zstd-frames"
#: Uncompressed bytes per frame, at most.
FRAME_SIZE = 2**20
#: Buffers of at least this size start a frame of their own (and end one), so a tensor is read without its
#: neighbours' bytes.
ALIGN = 64 * 1024
#: The most a reader reads from a member's end to find its index in one request (the index of a member up to
#: 2.7 GiB), so that the index and a header of up to 32 KiB come in under 64 KiB.
TAIL = 32 * 1024
#: Frames declaring more than this are refused: a reader allocates one frame at a time.
MAX_FRAME = 64 * 2**20

#: Compressed frames smaller than this are copied out of zstd's output buffer (see _Compressor).
_SMALL_FRAME = 64 * 1024
_SKIPPABLE = 0x184D2A5B
_FOOTER_MAGIC = b"BSFX"
_ENTRY = struct.Struct("<3L")
_HEAD = struct.Struct("<2L")  # skippable magic, frame size
_FOOT = struct.Struct("<L4s")  # frame count, magic

_BLOCK = 128 * 1024
_FRAME_HEADER = struct.Struct("<IBBQ")
_FULL_BLOCK = (_BLOCK << 3).to_bytes(3, "little")  # raw block, not last, 128 KiB
_LAST_BLOCK = b"\x01\x00\x00"  # raw block, last, empty
_BATCH = 16 * 2**20


# -- writing -------------------------------------------------------------------------------------------------


def plan(pieces: Iterable[Any]) -> Iterator[list[memoryview]]:
    """The payload's pieces (its head, then its buffers) grouped into frames, each a list of views."""
    it = iter(pieces)
    head = memoryview(next(it)).cast("B")
    yield from ([head[i : i + FRAME_SIZE]] for i in range(0, head.nbytes, FRAME_SIZE))
    group: list[memoryview] = []
    size = 0
    for piece in it:
        view = memoryview(piece).cast("B")
        if view.nbytes >= ALIGN or size + view.nbytes > FRAME_SIZE:
            if group:
                yield group
            group, size = [], 0
        if view.nbytes >= ALIGN:
            yield from ([view[i : i + FRAME_SIZE]] for i in range(0, view.nbytes, FRAME_SIZE))
        elif view.nbytes:
            group.append(view)
            size += view.nbytes
    if group:
        yield group


def _stored(pieces: list[memoryview]) -> list[Any]:
    """One frame of raw blocks holding ``pieces``: the zstd header, then each block's header and data."""
    data = pieces[0] if len(pieces) == 1 else memoryview(b"".join(pieces))
    # descriptor 0xC0: 8-byte content size, no checksum; window byte 0x38: 2**17
    out: list[Any] = [_FRAME_HEADER.pack(0xFD2FB528, 0xC0, 0x38, data.nbytes)]
    for start in range(0, data.nbytes, _BLOCK):
        block = data[start : start + _BLOCK]
        out += (_FULL_BLOCK if block.nbytes == _BLOCK else (block.nbytes << 3).to_bytes(3, "little"), block)
    out.append(_LAST_BLOCK)
    return out


class _Compressor:
    """Compresses frames at one level, each thread with its own zstd context."""

    def __init__(self, level: int) -> None:
        self._level = level
        self._local = threading.local()

    def __call__(self, pieces: list[memoryview]) -> list[Any]:
        cctx = getattr(self._local, "cctx", None)
        if cctx is None:
            cctx = self._local.cctx = zstandard.ZstdCompressor(level=self._level, write_checksum=True)
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        out = cctx.compress(data)
        # compress() leaves a small frame in an allocation of the frame's bound (~1 MiB), a page of it resident:
        # a batch of thousands of tiny frames held 4 KiB each (40 MiB for 10 GiB of zeros); a copy frees it.
        return [bytes(memoryview(out)) if len(out) < _SMALL_FRAME else out]


def write_frames(
    sink: MemberSink,
    pieces: Iterable[Any],
    *,
    level: int | None,
    threads: int = 0,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write a payload as frames and their index to ``sink``; return the number of frames.

    ``level`` None stores raw blocks. With ``threads`` (-1: one per core) frames are compressed on that many
    threads, at most two per thread in flight, written in order.
    """
    encode: Callable[[list[memoryview]], list[Any]] = _stored if level is None else _Compressor(level)
    workers = (os.cpu_count() or 1) if threads < 0 else threads
    entries = bytearray()
    count = 0
    batch: list[Any] = []  # frames written together, so that a local file gets 16 MiB per writev call
    batch_crc = batch_size = 0

    def flush() -> None:
        nonlocal batch, batch_crc, batch_size
        if batch:
            sink.write_pieces(batch, crc=batch_crc)
        batch, batch_crc, batch_size = [], 0, 0

    def emit(frame: list[Any], raw: int) -> None:
        nonlocal count, batch_crc, batch_size
        crc = stored = 0
        for part in frame:
            crc = crc32(part, crc)
            stored += memoryview(part).nbytes
        entries.extend(_ENTRY.pack(stored, raw, crc))
        count += 1
        batch.extend(frame)
        batch_crc = crc32_combine(batch_crc, crc, stored)
        batch_size += stored
        if batch_size >= _BATCH:
            flush()
        if progress is not None:
            progress(raw)

    frames = plan(pieces)
    if level is None or workers <= 1:
        for group in frames:
            emit(encode(group), sum(v.nbytes for v in group))
    else:
        with Pool(workers, thread_name_prefix="bucketsnap-zstd") as pool:
            pending: deque[tuple[Future[list[Any]], int]] = deque()
            for group in frames:
                pending.append((pool.submit(encode, group), sum(v.nbytes for v in group)))
                if len(pending) >= 2 * workers:
                    future, raw = pending.popleft()
                    emit(future.result(), raw)
            while pending:
                future, raw = pending.popleft()
                emit(future.result(), raw)
    flush()
    body = bytes(entries) + _FOOT.pack(count, _FOOTER_MAGIC)
    sink.write(_HEAD.pack(_SKIPPABLE, len(body)) + body)
    return count


# -- reading -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameIndex:
    """Where each frame of a member is: offsets relative to the member's data, raw offsets in its payload."""

    raw_starts: list[int]
    stored_starts: list[int]
    stored_sizes: list[int]
    raw_sizes: list[int]
    crcs: list[int]
    #: the index frame's own bytes, whose CRC-32 completes the member's
    raw_index: bytes
    #: the member's last bytes as read with the index (offset in the member's data, bytes)
    tail: tuple[int, bytes] = (0, b"")

    def frames(self, start: int, end: int) -> range:
        """The frames holding payload bytes ``[start, end)``."""
        if end <= start:
            return range(0)
        first = bisect.bisect_right(self.raw_starts, start) - 1
        last = bisect.bisect_left(self.raw_starts, end) - 1
        return range(max(first, 0), last + 1)


def read_index(read_range: ReadRange, offset: int, stored_size: int, raw_size: int, *, where: str) -> FrameIndex:
    """The frame index of the member whose data is ``[offset, offset + stored_size)``: one ranged read of at
    most :data:`TAIL` bytes, and a second of the rest of the index only for members of several GiB. The bytes
    read are kept in :attr:`FrameIndex.tail`.

    Raises:
        CorruptSnapshotError: no index, or one whose sizes do not add up to the member's.
    """
    tail_size = min(stored_size, TAIL)
    tail = read_range(offset + stored_size - tail_size, offset + stored_size)
    if len(tail) != tail_size or tail_size < _HEAD.size + _FOOT.size:
        raise CorruptSnapshotError(f"{where}: truncated member: no frame index")
    count, magic = _FOOT.unpack_from(tail, tail_size - _FOOT.size)
    size = _HEAD.size + _ENTRY.size * count + _FOOT.size
    if magic != _FOOTER_MAGIC or size > stored_size:
        raise CorruptSnapshotError(f"{where}: no frame index at the end of the member (corrupt or truncated)")
    if size > tail_size:
        start = offset + stored_size - size
        tail = read_range(start, start + size - tail_size) + tail
    raw_index = bytes(tail[-size:])
    skippable, body = _HEAD.unpack_from(raw_index)
    if skippable != _SKIPPABLE or body != size - _HEAD.size:
        raise CorruptSnapshotError(f"{where}: malformed frame index header")
    stored_sizes, raw_sizes, crcs = [], [], []
    for stored, raw, crc in _ENTRY.iter_unpack(raw_index[_HEAD.size : size - _FOOT.size]):
        stored_sizes.append(stored)
        raw_sizes.append(raw)
        crcs.append(crc)
    if sum(stored_sizes) + size != stored_size or sum(raw_sizes) != raw_size or max(raw_sizes, default=0) > MAX_FRAME:
        raise CorruptSnapshotError(
            f"{where}: frame index: member size differs from the declared size ({sum(stored_sizes)} + {size} stored "
            f"bytes of {stored_size}, {sum(raw_sizes)} raw bytes of {raw_size})"
        )
    for i, (stored, raw) in enumerate(zip(stored_sizes, raw_sizes, strict=True)):
        if stored > stored_bound(raw):  # a frame padded out (empty blocks) would be fetched and walked whole
            raise CorruptSnapshotError(
                f"{where}: frame index: frame {i} stores {stored} bytes for {raw}, more than zstd ever writes"
            )
    starts = _starts(stored_sizes)
    return FrameIndex(
        _starts(raw_sizes), starts, stored_sizes, raw_sizes, crcs, raw_index, (stored_size - len(tail), tail)
    )


def stored_bound(raw: int) -> int:
    """The most bytes a zstd frame of ``raw`` content bytes takes: zstd's ``ZSTD_compressBound`` (what a
    compressor may write at worst), plus room for the largest frame header (18 bytes) and a content checksum."""
    small = (128 * 2**10 - raw) >> 11 if raw < 128 * 2**10 else 0
    return raw + (raw >> 8) + small + 32


def _starts(sizes: list[int]) -> list[int]:
    out, pos = [], 0
    for n in sizes:
        out.append(pos)
        pos += n
    return out


def member_crc(index: FrameIndex) -> int:
    """The CRC-32 of the whole member as its index describes it: its frames' CRC-32s and its own bytes'."""
    crc = 0
    for part, size in zip(index.crcs, index.stored_sizes, strict=True):
        crc = crc32_combine(crc, part, size)
    return crc32(index.raw_index, crc)
