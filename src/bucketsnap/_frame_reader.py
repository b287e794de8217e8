"""Reading a seekable member's frames: raw blocks copied straight into the caller's buffer, frames on many threads.

A restore of a seekable member (codec ``"zstd-frames"``, :mod:`bucketsnap._frames`) reads its frames in
*units*: runs of whole frames of at most :data:`~bucketsnap._zipformat.READ_CHUNK` (4 MiB) raw bytes (and as
many stored bytes, give or take their headers), each one ranged request. A unit is fetched and decoded on a
thread of the read pool, up to :data:`~bucketsnap._zipformat.READ_AHEAD` (8) units ahead of the consumer, so
frames are decoded on as many threads as are in flight and the consumer only copies each unit's bytes, in
order, into its buffers (the tensors being restored). Decoding a frame means:

* its stored bytes checked against the CRC-32 in the frame index;
* its zstd frame header and block headers parsed here (RFC 8878): a raw block *is* its bytes, kept as where
  they lie in the fetched bytes; an RLE block is one byte repeated, kept as that byte and a count. Neither is
  copied until the consumer copies it into its buffer, once;
* a frame holding a compressed block, or carrying a content checksum (XXH64, which only zstd computes here),
  handed whole to zstd, which checks the checksum, and decoded into a buffer an earlier unit freed (new
  memory for each frame would be faulted in each time): its bytes are then copied once more, into the tensor;
* its declared content size, the sum of its blocks and its end checked against the index's sizes.

The consumer's copies are ``ctypes.memmove`` calls, which release the GIL, so the event loop receiving the next
units runs meanwhile; the destination's pages are faulted in on a pool thread as the first units arrive
(:mod:`bucketsnap._prefault`).

Trade-off: a whole-member read first reads the member's last 32 KiB for the index (one request more than a
plain forward read, none for a member that fits in it, whose frames are then served from those bytes), to cut
the member into frame-aligned units that decode independently. The index is checked against the member's
CRC-32 from the manifest before any frame is fetched: the CRC-32s of the frames it lists, folded together
with its own bytes', must give the member's. Every stored byte is so still covered by that CRC-32 (each
frame's bytes by the index's CRC-32 of them, the index by the member's), as when the member was read forward.

Where the ranged reads can fill a caller's buffer (their ``into``: :meth:`bucketsnap._storage.Storage.read_into`,
which on S3 and GCS copies each piece of the HTTP response in as it arrives), a unit of raw frames is read into
one of those reused buffers rather than into new bytes per request: new memory is faulted in by the kernel
(0.3-0.4 s of system CPU per GB here), and the HTTP clients join a response's pieces into it, one more copy.

Memory, whatever the member's size: at most ``READ_AHEAD + 1`` units are held at once (those in flight and the
one being copied). A unit of raw frames holds its stored bytes (4 MiB and their headers), a compressed one its
decoded bytes, each in one of at most ``READ_AHEAD + 1`` reused buffers of 4 MiB and 64 KiB (a compressed
unit's stored bytes only while it is decoded): 37 MiB for raw members, at most 72 MiB for compressed ones,
for frames bucketsnap writes (at most 1 MiB raw). A unit of one larger frame (a frame index allows up to
64 MiB) holds that frame.
"""

from __future__ import annotations

import ctypes
import io
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import zstandard

from bucketsnap._frames import FrameIndex
from bucketsnap._prefault import prefault
from bucketsnap._zipformat import READ_AHEAD, READ_CHUNK, ReadRange, _prefetch_pool, crc32
from bucketsnap.errors import BucketsnapError, CorruptSnapshotError

__all__ = ["FramesReader", "ReadInto", "decode_frame", "read_payload", "reads_into", "units"]

_MAGIC = 0xFD2FB528
#: RFC 8878's largest block: no block may hold or regenerate more.
_BLOCK_MAX = 128 * 1024
_FCS_SIZES = (0, 2, 4, 8)
_DICT_ID_SIZES = (0, 1, 2, 4)

#: One piece of a frame's raw bytes, ``(owner, address, length)``: ``length`` bytes to copy from ``address``,
#: inside the bytes object ``owner`` (which keeps them alive); or, where ``owner`` is None, the byte ``address``
#: repeated ``length`` times (an RLE block).
Piece = tuple[bytes | bytearray | None, int, int]

#: A ranged read into a caller's buffer: ``into(start, buffer)`` -> the bytes read (see :func:`reads_into`).
ReadInto = Callable[[int, memoryview], int]

_local = threading.local()


def _dctx() -> zstandard.ZstdDecompressor:
    dctx: zstandard.ZstdDecompressor | None = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


def address(data: bytes | bytearray) -> int:
    """Where the bytes of ``data`` are in memory (valid while ``data`` lives, and a bytearray is not resized)."""
    if isinstance(data, bytes):
        return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0
    return ctypes.addressof(ctypes.c_char.from_buffer(data)) if data else 0


def reads_into(read_range: ReadRange) -> ReadInto | None:
    """The ranged read into a buffer that ``read_range`` carries as its ``into`` attribute, if any:
    ``into(start, buffer)`` fills ``buffer`` with the bytes from ``start`` and returns how many it read."""
    into: ReadInto | None = getattr(read_range, "into", None)
    return into


def decode_frame(
    data: bytes | bytearray,
    start: int,
    length: int,
    raw_size: int,
    *,
    where: str,
    into: tuple[bytearray, int] | None = None,
) -> list[Piece]:
    """The ``raw_size`` raw bytes of the zstd frame ``data[start : start + length]``, as pieces in order.

    Raw and RLE blocks are returned without copying (where their bytes are in ``data``, or a byte and its
    count); a frame with a compressed block or a content checksum is decompressed by zstd (checksum checked)
    into one piece: into ``buffer[at : at + raw_size]`` where ``into`` is ``(buffer, at)``, else new bytes.

    Raises:
        CorruptSnapshotError: a malformed header or block, a frame shorter or longer than its blocks, a
            content size other than ``raw_size``, or, from zstd, corrupt data or a checksum mismatch.
    """
    frame = memoryview(data)[start : start + length]
    n = frame.nbytes
    if n < 6 or int.from_bytes(frame[:4], "little") != _MAGIC:
        raise CorruptSnapshotError(f"{where}: not a zstd frame (bad magic number)")
    descriptor = frame[4]
    single_segment = descriptor >> 5 & 1
    if descriptor & 0x08:
        raise CorruptSnapshotError(f"{where}: corrupt zstd frame header (reserved bit set)")
    pos = 5
    window = 0
    if not single_segment:
        exponent, mantissa = frame[pos] >> 3, frame[pos] & 7
        base = 1 << (10 + exponent)
        window = base + base // 8 * mantissa
        pos += 1
    dict_size = _DICT_ID_SIZES[descriptor & 3]
    has_dict = dict_size and int.from_bytes(frame[pos : pos + dict_size], "little") != 0
    pos += dict_size
    fcs_size = _FCS_SIZES[descriptor >> 6] or single_segment  # flag 0: 1 byte in a single segment, else none
    content = int.from_bytes(frame[pos : pos + fcs_size], "little") + (256 if fcs_size == 2 else 0)
    pos += fcs_size
    if not fcs_size or content != raw_size or pos > n:
        raise CorruptSnapshotError(f"{where}: frame size differs from the index's {raw_size} bytes")
    block_max = min(content if single_segment else window, _BLOCK_MAX)
    base = address(data) + start
    zstd_needed = bool(has_dict or descriptor & 0x04)  # a dictionary, or a content checksum: zstd's to check
    pieces: list[Piece] = []
    produced = 0
    last = 0
    while not last:
        if pos + 3 > n:
            raise CorruptSnapshotError(f"{where}: truncated zstd frame (a block header is missing)")
        header = frame[pos] | frame[pos + 1] << 8 | frame[pos + 2] << 16
        pos += 3
        last, kind, size = header & 1, header >> 1 & 3, header >> 3
        if size > block_max or kind == 3:
            raise CorruptSnapshotError(f"{where}: corrupt zstd block (type {kind}, {size} bytes)")
        stored = 1 if kind == 1 else size
        if pos + stored > n:
            raise CorruptSnapshotError(f"{where}: truncated zstd frame (a block runs past the frame's end)")
        if kind == 2:
            zstd_needed = True
        elif size:
            pieces.append((data, base + pos, size) if kind == 0 else (None, frame[pos], size))
            produced += size
            if produced > raw_size:
                raise CorruptSnapshotError(f"{where}: frame holds more than the index's {raw_size} bytes")
        pos += stored
    end = pos + 4 * (descriptor >> 2 & 1)
    if end != n:
        raise CorruptSnapshotError(f"{where}: the zstd frame ends at byte {end} of the {n} stored for it")
    if not zstd_needed:
        if produced != raw_size:
            raise CorruptSnapshotError(f"{where}: frame decompresses to {produced} bytes, not {raw_size}")
        return pieces
    try:
        if into is None:
            whole = _dctx().decompress(frame)
            owner: bytes | bytearray = whole
            got, at = len(whole), address(whole)
        else:
            buffer, at = into
            owner = buffer
            with _dctx().stream_reader(frame, read_across_frames=False) as reader:
                got = reader.readinto(memoryview(buffer)[at : at + raw_size])
                got += len(reader.read(1))  # the frame's end, where zstd checks its checksum
            at += ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    except zstandard.ZstdError as exc:
        raise CorruptSnapshotError(f"{where}: corrupt zstd data: {exc}") from exc
    if got != raw_size:
        raise CorruptSnapshotError(f"{where}: frame decompresses to {got} bytes or more, not {raw_size}")
    return [(owner, at, raw_size)]


#: A unit's stored bytes may exceed READ_CHUNK by its frames' headers: 4 raw frames of 1 MiB are one request.
_UNIT_STORED = READ_CHUNK + READ_CHUNK // 64


def units(index: FrameIndex, frames: range) -> Iterator[range]:
    """``frames`` in runs of whole frames of at most READ_CHUNK raw bytes and about as many stored bytes (or one
    larger frame)."""
    first = frames.start
    stored = raw = 0
    for i in frames:
        if i > first and (stored + index.stored_sizes[i] > _UNIT_STORED or raw + index.raw_sizes[i] > READ_CHUNK):
            yield range(first, i)
            first, stored, raw = i, 0, 0
        stored += index.stored_sizes[i]
        raw += index.raw_sizes[i]
    if first < frames.stop:
        yield range(first, frames.stop)


def _load_unit(
    read_range: ReadRange, offset: int, index: FrameIndex, unit: range, where: str, out: bytearray | None = None
) -> list[Piece]:
    """Fetch the frames ``unit`` in one request, check each against its CRC-32, and decode them.

    Where ``out`` is given: a unit of raw frames is read into it (with ``read_range``'s ``into``), and its pieces
    point into it; a compressed unit's frames are decoded into it, at their offsets in the unit's raw bytes.
    """
    lo = index.stored_starts[unit.start]
    hi = index.stored_starts[unit[-1]] + index.stored_sizes[unit[-1]]
    read_into = reads_into(read_range)
    data: bytes | bytearray
    if out is not None and read_into is not None and _is_raw(index, unit):
        data, out = out, None  # the stored bytes are the pieces' owner: nothing is decoded into a buffer
        got = read_into(offset + lo, memoryview(data)[: hi - lo])
    else:
        data = bytes(read_range(offset + lo, offset + hi))  # no copy of bytes: what the backends return
        got = len(data)
    if got != hi - lo:
        raise CorruptSnapshotError(f"{where}: truncated: wanted bytes {offset + lo}-{offset + hi}, got {got}")
    view = memoryview(data)
    pieces: list[Piece] = []
    for i in unit:
        start, size = index.stored_starts[i] - lo, index.stored_sizes[i]
        if crc32(view[start : start + size]) != index.crcs[i]:
            raise CorruptSnapshotError(f"{where} frame {i}: checksum mismatch: the stored bytes are corrupt")
        into = None if out is None else (out, index.raw_starts[i] - index.raw_starts[unit.start])
        pieces += decode_frame(data, start, size, index.raw_sizes[i], where=f"{where} frame {i}", into=into)
    return pieces


def _span(starts: list[int], sizes: list[int], unit: range) -> int:
    return starts[unit[-1]] + sizes[unit[-1]] - starts[unit.start]


def _is_raw(index: FrameIndex, unit: range) -> bool:
    """Whether the unit's frames are stored at least as large as their content: raw blocks, nothing to decode."""
    return _span(index.stored_starts, index.stored_sizes, unit) >= _span(index.raw_starts, index.raw_sizes, unit)


class FramesReader(io.RawIOBase):
    """Payload bytes ``[start, end)`` of a seekable member, decoding only the frames that hold them.

    The frames are fetched and decoded in units on the read pool, ``read_ahead`` units ahead (see the module
    docstring), and handed over in order; :meth:`readinto` copies their bytes into the caller's buffer, filling
    as much of it as the decoded units allow. Every frame is checked against its CRC-32 and its declared sizes.

    Args:
        read_range: ranged reads of the object holding the member.
        offset: the offset of the member's data in that object.
    """

    def __init__(
        self,
        read_range: ReadRange,
        offset: int,
        index: FrameIndex,
        start: int,
        end: int,
        *,
        where: str,
        read_ahead: int = READ_AHEAD,
    ) -> None:
        count = len(index.raw_sizes)
        whole = start == 0 and end == (index.raw_starts[-1] + index.raw_sizes[-1] if count else 0)
        span = range(count) if whole else index.frames(start, end)  # whole: empty frames too, all bytes checked
        self._units = deque(units(index, span))
        self._index = index
        self._args = (read_range, offset, index)
        self._pending: deque[tuple[Future[list[Piece]], bytearray | None]] = deque()
        self._buffer: bytearray | None = None  # the one holding the pieces being copied
        self._spares: list[bytearray] = []
        self._read_ahead = max(read_ahead, 1)
        self._pieces: deque[Piece] = deque()
        self._skip = start - index.raw_starts[span.start] if span else 0  # bytes of the first frame before start
        self._left = end - start
        self._where = where
        self._dropped = False  # closed by the finalizer (see __del__)
        self._failed = False  # a readinto raised

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        want = min(view.nbytes, self._left)
        if not want:
            return 0
        if self._failed:  # a unit taken when it raised was not copied: what follows would not be the member's bytes
            raise BucketsnapError(f"{self._where}: an earlier read of this member failed; read it again")
        prefault(view[:want], background=_prefetch_pool().submit)
        dest = ctypes.addressof(ctypes.c_char.from_buffer(view))
        got = 0
        try:
            while got < want:
                if not self._pieces and not self._next_unit():
                    break
                owner, at, count = self._pieces.popleft()
                if self._skip:
                    skipped = min(self._skip, count)
                    self._skip -= skipped
                    count -= skipped
                    at += skipped if owner is not None else 0
                n = min(count, want - got)
                # ctypes calls release the GIL: the event loop fetching the next units runs meanwhile
                if owner is None:
                    ctypes.memset(dest + got, at, n)
                else:
                    ctypes.memmove(dest + got, at, n)
                if count > n:
                    self._pieces.appendleft((owner, at + n if owner is not None else at, count - n))
                got += n
        except BaseException:
            self._failed = True
            raise
        self._left -= got
        return got

    def _next_unit(self) -> bool:
        """Move the next unit's pieces into :attr:`_pieces` (keeping ``read_ahead`` units in flight); False at
        the end. Called once the previous unit's pieces are all copied: its buffer is free again."""
        if self._buffer is not None:
            self._spares.append(self._buffer)
            self._buffer = None
        if not self._pending:
            if not self._units:
                return False
            if len(self._units) == 1:  # the only unit left: no thread to hand it over from
                unit, self._buffer = self._units.popleft(), None
                self._pieces.extend(_load_unit(*self._args, unit, self._where))
                return True
        pool = _prefetch_pool()
        while len(self._pending) < self._read_ahead and self._units:
            unit = self._units.popleft()
            out = self._out_buffer(unit)
            self._pending.append((pool.submit(_load_unit, *self._args, unit, self._where, out), out))
        future, self._buffer = self._pending.popleft()
        self._pieces.extend(future.result())
        return True

    def _out_buffer(self, unit: range) -> bytearray | None:
        """A buffer for the unit: its stored bytes where they are raw frames and the reads can fill a buffer, else
        its decompressed frames (None for raw frames otherwise). One freed by an earlier unit where it is large
        enough, so that every request and frame lands in memory already faulted in, not in new memory each time."""
        index = self._index
        raw = _span(index.raw_starts, index.raw_sizes, unit)
        stored = _span(index.stored_starts, index.stored_sizes, unit)
        if stored >= raw and reads_into(self._args[0]) is None:  # raw blocks: decoded without a copy
            return None
        need = stored if stored >= raw else raw  # a raw unit is read into it, a compressed one decoded into it
        for i, spare in enumerate(self._spares):
            if len(spare) >= need:
                return self._spares.pop(i)
        kept = _SPARES.take(need)
        return kept if kept is not None else bytearray(max(need, _UNIT_STORED))  # one size: any serves any unit

    def close(self) -> None:
        for future, _ in self._pending:
            future.cancel()  # those running finish on their own, into buffers of their own that are dropped
        self._pending.clear()
        self._pieces.clear()
        freed = self._spares if self._buffer is None else [*self._spares, self._buffer]
        self._spares, self._buffer = [], None
        if not self.closed and not self._dropped:
            _SPARES.give(freed)  # for the next member or restore: no unit of this reader writes into them now
        super().close()

    def __del__(self) -> None:
        # A reader dropped unclosed is closed by its finalizer, which keeps none of its buffers: keeping them takes
        # a lock and may start the timer that drops them, neither of which a finalizer may do (the code it
        # interrupted may hold that lock; a thread started as the interpreter exits never runs, and its start()
        # waits for it forever).
        self._dropped = True
        if hasattr(self, "_pending"):  # else __init__ failed: nothing to close
            super().__del__()


#: Seconds that buffers freed by a closed reader are kept for the next one (see :class:`_Kept`).
KEEP_S = 2.0


class _Kept:
    """Unit buffers freed by closed readers, kept for the next reader (a restore's next member, the next
    restore): new memory costs its page faults, 0.5-0.7 s of CPU per GB here, for every 37 MiB of buffers a
    member's reader would otherwise allocate. At most ``READ_AHEAD + 1`` are kept, and all are dropped once none
    was taken or given back for :data:`KEEP_S` seconds: an idle process holds none."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffers: list[bytearray] = []
        self._used = 0.0
        self._timer: threading.Timer | None = None

    def take(self, need: int) -> bytearray | None:
        with self._lock:
            for i, buffer in enumerate(self._buffers):
                if len(buffer) >= need:
                    self._used = time.monotonic()
                    return self._buffers.pop(i)
        return None

    def give(self, buffers: list[bytearray]) -> None:
        if sys.is_finalizing():  # a reader closed as the interpreter exits: a timer started now would never run,
            return  # and its start() would wait for it forever
        with self._lock:
            self._buffers += buffers[: max(0, READ_AHEAD + 1 - len(self._buffers))]
            self._used = time.monotonic()
            if self._buffers and self._timer is None:
                self._arm(KEEP_S)

    def held(self) -> int:
        """Bytes kept now."""
        with self._lock:
            return sum(len(b) for b in self._buffers)

    def expire(self) -> None:
        """Drop the buffers if idle for KEEP_S seconds, else look again when they would be (the timer's call)."""
        with self._lock:
            self._timer = None
            idle = time.monotonic() - self._used
            if idle >= KEEP_S or not self._buffers:
                self._buffers.clear()
            else:
                self._arm(KEEP_S - idle)

    def drop(self) -> None:
        with self._lock:
            self._buffers.clear()
            if self._timer is not None:
                self._timer.cancel()
            self._timer = None

    def _arm(self, delay: float) -> None:
        self._timer = threading.Timer(delay, self.expire)
        self._timer.daemon = True
        self._timer.start()

    def _after_fork(self) -> None:  # the parent's timer thread is not in the child
        self._lock = threading.Lock()
        self._buffers, self._timer = [], None


_SPARES = _Kept()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_SPARES._after_fork)


def read_payload(read_range: ReadRange, offset: int, index: FrameIndex, start: int, end: int, *, where: str) -> bytes:
    """Payload bytes ``[start, end)``, read as :class:`FramesReader` does."""
    out = bytearray(end - start)
    with FramesReader(read_range, offset, index, start, end, where=where) as reader:
        if reader.readinto(out) != len(out):
            raise CorruptSnapshotError(f"{where}: truncated payload")
    return bytes(out)
