"""Rows that repeat the next row of another field, stored once: the encoding of ``.shift.zst`` chunk objects.

An SB3 replay buffer holds every observation twice: ``next_observations[t]`` is ``observations[t + 1]``
except where an episode ended at ``t`` (and at the ring's write position). Hashing and compressing those rows
again costs CPU a second time (zstd finds the repeat, but only after reading every byte), so a chunk whose
value declares such a pair (``ChunkedArrays(shifted={"next_observations": "observations"})``) stores the
repeating field as records instead: "the next ``k`` rows repeat the source field's next rows" or "the next
``k`` rows follow, literally". A save compares each row with the source's next one (a memory compare, about 7
GB/s, against zstd's 1.8 GB/s), and a restore copies the repeated rows from the rows it has just decompressed.

What such an object decompresses to (every integer little-endian)::

    header   b"BSSHIFT1", u32 count, then count x (u64 source, u64 target, u64 row_bytes, u64 rows)
    body     the chunk's raw bytes in order, except that each region [target, target + rows x row_bytes)
             is a sequence of records: u64 (k << 1 | literal); a literal record is followed by its k rows,
             a repeat record stands for k rows, row r of the region being the raw bytes at
             source + (r + 1) x row_bytes

The regions are in order of ``target``; each is one whole field of the chunk (its offset, its row size, the
chunk's rows) of at least :data:`MIN_ROW_BYTES` per row, whose source is an earlier field of the same row size
(so ``source + rows x row_bytes <= target``); the last row of a region is always literal (its source row would be
the next chunk's). A restore rebuilds the raw bytes exactly. The chunk's id is the hash of what the object
decompresses to, as for any chunk: the records are a function of the rows (every run as long as it goes), so
equal rows get equal ids, and a save does not hash the repeated rows again.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import struct
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from bucketsnap.errors import CorruptSnapshotError

__all__ = ["MAGIC", "MIN_ROW_BYTES", "RegionWriter", "Scatter", "Shift", "decode", "header"]

MAGIC = b"BSSHIFT1"
_COUNT = struct.Struct("<I")
_SHIFT = struct.Struct("<QQQQ")
_RECORD = struct.Struct("<Q")
#: More regions than any table has fields is a corrupt header.
_MAX_SHIFTS = 4096
#: The smallest rows stored as shifted rows. Smaller ones are compared one call each where a block holds an
#: episode's end, which costs more than zstd's pass over them; and a reader refuses regions of smaller rows, so
#: that a hostile object cannot make it decode millions of one-byte records.
MIN_ROW_BYTES = 4096
_LITERAL = 1


@dataclass(frozen=True)
class Shift:
    """A region of a chunk's raw bytes: ``rows`` rows of ``row_bytes`` at ``target``, row r usually repeating
    the bytes at ``source + (r + 1) x row_bytes``."""

    source: int
    target: int
    row_bytes: int
    rows: int

    @property
    def end(self) -> int:
        return self.target + self.rows * self.row_bytes


def header(shifts: Sequence[Shift]) -> bytes:
    """The header of a ``.shift.zst`` object holding ``shifts``."""
    return (
        MAGIC
        + _COUNT.pack(len(shifts))
        + b"".join(_SHIFT.pack(s.source, s.target, s.row_bytes, s.rows) for s in shifts)
    )


class RegionWriter:
    """Writes one region's records, a block of rows at a time, comparing each row with its source row.

    Args:
        source: the source field's rows (a private copy, uint8, ``rows x row_bytes``).
        row_bytes: bytes per row.
        rows: the region's rows.
        write: where the records go (a zstd stream's ``write``).
    """

    def __init__(self, source: np.ndarray, row_bytes: int, rows: int, write: Any) -> None:
        self.source = source
        self.row_bytes = row_bytes
        self.rows = rows
        self.write = write
        self.done = 0
        self.repeats = 0  # a run of repeated rows not yet written

    def add(self, block: memoryview) -> None:
        """The next rows of the region (whole rows), as they are: written as records."""
        rb, start = self.row_bytes, self.done
        n = block.nbytes // rb
        comparable = max(0, min(n, self.rows - 1 - start))  # the region's last row has no source row here
        same = np.zeros(n, bool)
        if comparable:
            same[:comparable] = _rows_equal(
                np.frombuffer(block, np.uint8, count=comparable * rb),
                self.source[(start + 1) * rb : (start + 1 + comparable) * rb],
                rb,
            )
        edges = np.flatnonzero(np.diff(same.view(np.int8))) + 1
        for a, b in zip([0, *edges.tolist()], [*edges.tolist(), n], strict=True):
            if same[a]:
                self.repeats += b - a
                continue
            self._flush()
            self.write(_RECORD.pack((b - a) << 1 | _LITERAL))
            self.write(block[a * rb : b * rb])
        self.done += n

    def close(self) -> None:
        """Write the repeat run left open; the region must be complete."""
        if self.done != self.rows:
            raise AssertionError(f"a region of {self.rows} rows was given {self.done}")
        self._flush()

    def _flush(self) -> None:
        if self.repeats:
            self.write(_RECORD.pack(self.repeats << 1))
            self.repeats = 0


def _rows_equal(rows: np.ndarray, source: np.ndarray, row_bytes: int) -> np.ndarray:
    """Per row, whether ``rows`` equals ``source`` (flat uint8 arrays of whole rows): one ``memcmp`` of the whole
    block first (every row repeats, but where an episode ended), then one per row; numpy where there is no C
    library to call."""
    n = rows.nbytes // row_bytes
    memcmp = _memcmp()
    if memcmp is None:
        return np.asarray((rows.reshape(n, row_bytes) == source.reshape(n, row_bytes)).all(axis=1))
    a, b = rows.ctypes.data, source.ctypes.data
    if memcmp(a, b, rows.nbytes) == 0:
        return np.ones(n, bool)
    return np.fromiter((memcmp(a + i * row_bytes, b + i * row_bytes, row_bytes) == 0 for i in range(n)), bool, n)


_libc_memcmp: Any = None


def _memcmp() -> Any:
    """The C library's ``memcmp`` (ctypes releases the GIL while it runs), or None where there is none."""
    global _libc_memcmp
    if _libc_memcmp is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") if sys.platform == "win32" else None)
            memcmp = libc.memcmp
            memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
            memcmp.restype = ctypes.c_int
            _libc_memcmp = memcmp
        except (OSError, AttributeError, TypeError):
            _libc_memcmp = False
    return _libc_memcmp or None


class Scatter:
    """A chunk's raw bytes as they land in several destination buffers (one per field, in order)."""

    def __init__(self, views: Sequence[memoryview]) -> None:
        self.arrays = [np.frombuffer(v, np.uint8) for v in views]
        self.views = list(views)
        self.starts = np.concatenate([[0], np.cumsum([v.nbytes for v in views], dtype=np.int64)]).tolist()
        self.size = int(self.starts[-1])

    def pieces(self, start: int, n: int) -> Iterator[tuple[int, int, int]]:
        """``(buffer, offset, length)`` of the raw bytes ``[start, start + n)``."""
        end = start + n
        for i, (a, b) in enumerate(zip(self.starts, self.starts[1:], strict=False)):
            lo, hi = max(a, start), min(b, end)
            if lo < hi:
                yield i, lo - a, hi - lo

    def fill(self, z: BinaryIO, start: int, n: int, where: str, digest: Any = None) -> None:
        """Read raw bytes ``[start, start + n)`` from the decompressing stream ``z`` (into ``digest`` too)."""
        for i, offset, length in self.pieces(start, n):
            view, got = self.views[i], 0
            while got < length:
                r = z.readinto(view[offset + got : offset + length])  # type: ignore[attr-defined]
                if not r:
                    raise CorruptSnapshotError(f"{where}: decompresses to fewer bytes than its rows need")
                got += r
            if digest is not None:
                digest.update(view[offset : offset + length])

    def copy(self, src: int, dst: int, n: int) -> None:
        """Copy raw bytes ``[src, src + n)``, already filled, to ``[dst, dst + n)`` (after them)."""
        sources = list(self.pieces(src, n))
        targets = list(self.pieces(dst, n))
        si = ti = so = to = 0
        while si < len(sources) and ti < len(targets):
            s_buf, s_off, s_len = sources[si]
            t_buf, t_off, t_len = targets[ti]
            k = min(s_len - so, t_len - to)
            np.copyto(self.arrays[t_buf][t_off + to : t_off + to + k], self.arrays[s_buf][s_off + so : s_off + so + k])
            so, to = so + k, to + k
            if so == s_len:
                si, so = si + 1, 0
            if to == t_len:
                ti, to = ti + 1, 0


def decode(z: BinaryIO, scatter: Scatter, row_bytes: Sequence[int], where: str, digest: Any = None) -> None:
    """Decompress a ``.shift.zst`` chunk from ``z`` into ``scatter`` (one buffer per field, of ``row_bytes``
    per row): its raw bytes, rebuilt whole; ``digest`` (a hash object), if given, is fed every byte
    decompressed, in order (the chunk's id is their hash).

    Each region must be one whole field of at least :data:`MIN_ROW_BYTES` per row, repeating an earlier field
    of the same row size, else the object is refused.
    """
    shifts = _read_header(z, scatter.size, where, digest)
    fields = {start: (i, rb) for i, (start, rb) in enumerate(zip(scatter.starts, row_bytes, strict=False))}
    for s in shifts:
        target, source = fields.get(s.target), fields.get(s.source)
        rows = scatter.views[target[0]].nbytes // max(1, target[1]) if target else 0
        if (
            target is None
            or source is None
            or source[0] >= target[0]
            or target[1] != s.row_bytes
            or source[1] != s.row_bytes
            or s.rows != rows
            or s.row_bytes < MIN_ROW_BYTES
        ):
            raise CorruptSnapshotError(f"{where}: a shifted-rows region is not one whole field of the table: {s}")
    pos = 0
    for s in shifts:
        scatter.fill(z, pos, s.target - pos, where, digest)
        r = 0
        while r < s.rows:
            record = _read_exact(z, _RECORD.size, where)
            if digest is not None:
                digest.update(record)
            (word,) = _RECORD.unpack(record)
            k = word >> 1
            if k == 0:
                raise CorruptSnapshotError(f"{where}: a row record ({word:#x}) covers no row")
            if r + k > s.rows or (not word & _LITERAL and r + k > s.rows - 1):
                raise CorruptSnapshotError(f"{where}: a row record ({word:#x}) runs past its region")
            at = s.target + r * s.row_bytes
            if word & _LITERAL:
                scatter.fill(z, at, k * s.row_bytes, where, digest)
            else:
                scatter.copy(s.source + (r + 1) * s.row_bytes, at, k * s.row_bytes)
            r += k
        pos = s.end
    scatter.fill(z, pos, scatter.size - pos, where, digest)


def _read_header(z: BinaryIO, raw_size: int, where: str, digest: Any = None) -> list[Shift]:
    head = _read_exact(z, len(MAGIC) + _COUNT.size, where)
    if head[: len(MAGIC)] != MAGIC:
        raise CorruptSnapshotError(f"{where}: not a shifted-rows chunk (no {MAGIC.decode()} header)")
    (count,) = _COUNT.unpack(head[len(MAGIC) :])
    if not 0 < count <= _MAX_SHIFTS:
        raise CorruptSnapshotError(f"{where}: a shifted-rows header declares {count} regions")
    regions = _read_exact(z, count * _SHIFT.size, where)
    if digest is not None:
        digest.update(head)
        digest.update(regions)
    shifts = [Shift(*fields) for fields in _SHIFT.iter_unpack(regions)]
    end = 0
    for s in shifts:
        if (
            s.rows < 1
            or s.row_bytes < 1
            or s.target < end
            or s.end > raw_size
            or s.source + s.rows * s.row_bytes > s.target
        ):
            raise CorruptSnapshotError(f"{where}: a shifted-rows region lies outside its chunk or overlaps: {s}")
        end = s.end
    return shifts


def _read_exact(z: BinaryIO, n: int, where: str) -> bytes:
    data = z.read(n)
    if len(data) != n:
        raise CorruptSnapshotError(f"{where}: decompresses to fewer bytes than its rows need")
    return data
