"""The snapshot archive: a standard zip whose members are independent zstd frames, plus ``meta.json``.

Layout (``unzip -l`` lists it; ``unzip -p snap.zip policy.zst | zstd -d`` recovers one member by hand)::

    <key>.zst     one per top-level key of the saved state, zip method STORED, holding the payload
                  described in :mod:`bucketsnap._values` as independent zstd frames of at most 1 MiB and a
                  frame index (codec ``"zstd-frames"``, see :mod:`bucketsnap._frames`), so that one tensor
                  is read without the rest; archives written before it hold one zstd frame (codec ``"zstd"``):
                  compressed with zstd's content checksum, or stored as raw zstd blocks (see ``_StoredFrame``).
                  Either way incompressible members are raw zstd blocks, written without copying
    ...
    meta.json     format version, library versions, itr, creation time, metrics, and per member its
                  codec, offset, raw and stored sizes and CRC-32

Members are written through a forward-only stream (:mod:`bucketsnap._zipformat`), so every entry uses a zip
data descriptor and ZIP64 sizes where needed; the same bytes come out whether the destination is a local file
or a multipart upload. Each member's data offset is recorded in ``meta.json`` and in the manifest, so a reader
fetches one member with one ranged request and never reads the central directory;
:func:`bucketsnap._zipformat.read_directory` reads it for tools that only have the archive.

This module reads and writes file objects and byte ranges only; it knows no URLs.
"""

from __future__ import annotations

import io
import json
import struct
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING, Any, BinaryIO

import zstandard

from bucketsnap import _frames
from bucketsnap._frame_reader import FramesReader
from bucketsnap._info import MemberInfo, crc32_checksum
from bucketsnap._zipformat import (
    READ_AHEAD,
    READ_CHUNK,
    MemberSink,
    RangeReader,
    ReadRange,
    ZipStreamWriter,
    crc32,
    crc32_combine,
)
from bucketsnap.errors import CorruptSnapshotError, UnsafeLoadError

if TYPE_CHECKING:  # _values imports torch: imported where a value is encoded or decoded, so verify needs no torch
    from bucketsnap._values import EncodedValue, MapLocation

__all__ = [
    "FORMAT_VERSION",
    "META_NAME",
    "ArchiveWriter",
    "load_member",
    "member_name",
    "verify_member",
    "verify_object",
]

FORMAT_VERSION = 1
META_NAME = "meta.json"
_WRITE_CHUNK = 2**20
#: The codec new members are written with: ``"zstd-frames"``; ``"zstd"`` (one frame, what bucketsnap wrote
#: before seekable members) remains for tests of older archives.
WRITE_CODEC = _frames.CODEC
#: Members whose sample does not compress below this ratio are stored in raw zstd blocks. Float weights and
#: Adam moments compress to about 0.9 at level 3, at 200-400 MB/s on one core: 2-5 times the cost of the
#: write, to save a tenth of the bytes. Compression pays when it at least halves a member (frames, masks,
#: sparse or repetitive arrays compress 10 to 500 times).
INCOMPRESSIBLE_RATIO = 0.5
_SAMPLE = 256 * 1024


def member_name(key: str) -> str:
    return f"{key}.zst"


class ArchiveWriter:
    """Writes one snapshot archive to a binary stream: :meth:`add` each key, then :meth:`finish`.

    Args:
        dest: a writable binary file object (not closed by the writer); if it has a ``writev(pieces)`` method,
            incompressible members go out through it in large batches of pieces (see :mod:`bucketsnap._zipformat`).
        level: zstd level for compressible members.
        threads: zstd worker threads (0: compress in the calling thread; -1: one per core).
        progress: called with each count of uncompressed bytes as it is written.

    Attributes:
        members: key -> :class:`MemberInfo` of each member written so far.
        checksum: the whole archive's checksum (``"crc32:<8 hex>"``, see :func:`bucketsnap._info.crc32_checksum`)
            once :meth:`finish` has written it; None before.
    """

    def __init__(
        self,
        dest: IO[bytes],
        *,
        level: int = 3,
        threads: int = 0,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self._zip: ZipStreamWriter | None = ZipStreamWriter(dest)
        self._progress = progress
        self._level = level
        self._threads = threads
        self.members: dict[str, MemberInfo] = {}
        self.checksum: str | None = None

    def add(self, key: str, value: Any) -> MemberInfo:
        """Encode ``value`` and write it as member ``<key>.zst``."""
        from bucketsnap._values import encode

        return self.add_encoded(key, encode(value))

    def add_encoded(self, key: str, encoded: EncodedValue) -> MemberInfo:
        zip_ = self._open()
        name = member_name(key)
        raw_size = encoded.raw_size
        level = _choose_level(encoded, self._level)
        codec = WRITE_CODEC
        member = zip_.open_member(name, zip64=raw_size > 2**31)
        offset = member.tell()
        if codec == _frames.CODEC:
            _frames.write_frames(member, encoded.chunks(), level=level, threads=self._threads, progress=self._progress)
        else:
            self._write_one_frame(member, encoded, level)
        zip_.close_member(member)
        info = MemberInfo(
            name=name,
            offset=offset,
            stored_size=member.size,
            raw_size=raw_size,
            crc32=f"{member.crc:08x}",
            codec=codec,
            pickled=encoded.pickled,
        )
        self.members[key] = info
        return info

    def _write_one_frame(self, member: MemberSink, encoded: EncodedValue, level: int | None) -> None:
        with _frame_writer(member, level, encoded.raw_size, self._threads) as zw:
            for chunk in encoded.chunks():
                if self._progress is None:
                    zw.write(chunk)
                    continue
                view = memoryview(chunk).cast("B")
                for start in range(0, view.nbytes, READ_CHUNK):  # a tensor is one chunk: report in slices
                    zw.write(view[start : start + READ_CHUNK])
                    self._progress(min(READ_CHUNK, view.nbytes - start))

    def abandon(self) -> None:
        """Give up on a failed archive: nothing more is written to the destination."""
        self._zip = None

    def finish(self, meta: dict[str, Any]) -> int:
        """Write ``meta.json`` (with the member table added) and the central directory; return the size."""
        zip_ = self._open()
        meta = {**meta, "format_version": FORMAT_VERSION, "members": {k: m.to_json() for k, m in self.members.items()}}
        zip_.add_bytes(META_NAME, json.dumps(meta, indent=1, sort_keys=True).encode())
        size = zip_.close()
        self.checksum = crc32_checksum(zip_.crc)
        self._zip = None
        return size

    def _open(self) -> ZipStreamWriter:
        if self._zip is None:
            raise ValueError("this archive is finished or abandoned")
        return self._zip


def _choose_level(encoded: EncodedValue, level: int) -> int | None:
    """Sample the largest buffers; if they do not compress, return None: store them in raw zstd blocks."""
    big = sorted((b for b in encoded.buffers if b.nbytes >= _SAMPLE), key=lambda b: -b.nbytes)[:4]
    if level < 0 or not big:
        return level
    sample = b"".join(bytes(b.cast("B")[(b.nbytes - _SAMPLE) // 2 :][:_SAMPLE]) for b in big)
    ratio = len(zstandard.ZstdCompressor(level=1).compress(sample)) / len(sample)
    return None if ratio > INCOMPRESSIBLE_RATIO else level


def _frame_writer(member: MemberSink, level: int | None, raw_size: int, threads: int) -> Any:
    """A writer of one zstd frame into ``member``: compressed at ``level``, or stored when ``level`` is None."""
    if level is None:
        return _StoredFrame(member, raw_size)
    cctx = zstandard.ZstdCompressor(level=level, threads=threads, write_checksum=True)
    return cctx.stream_writer(member, size=raw_size, write_size=_WRITE_CHUNK, closefd=False)  # type: ignore[arg-type]


class _StoredFrame:
    """A zstd frame of raw (uncompressed) blocks, written straight from the caller's buffers.

    For incompressible members (float weights): even zstd's fastest level copies every byte through its
    buffers and hashes it, which costs as much as the disk write; a stored frame costs one CRC-32 pass (the
    zip's, which also covers these bytes) and no copy, and any zstd decoder reads it. Layout (RFC 8878): magic,
    a header with the 8-byte content size, a 128 KiB window and no content checksum, raw blocks of at most
    128 KiB, and an empty last block. Each block's 3-byte header and its data are handed to the zip member
    as separate pieces, :data:`_BATCH` blocks at a time, so a local file gets them in one ``writev`` call.
    """

    _HEADER = struct.Struct("<IBBQ")
    _BLOCK = 128 * 1024
    _FULL_BLOCK = (_BLOCK << 3).to_bytes(3, "little")  # raw block, not last, 128 KiB
    _BATCH = 128  # blocks per call: 16 MiB, 256 pieces (IOV_MAX is 1024)

    def __init__(self, member: MemberSink, raw_size: int) -> None:
        self._member = member
        # descriptor 0xC0: 8-byte content size, not single-segment, no checksum; window byte 0x38: 2**17
        member.write(self._HEADER.pack(0xFD2FB528, 0xC0, 0x38, raw_size))

    def __enter__(self) -> _StoredFrame:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self._member.write(b"\x01\x00\x00")  # last block: raw, empty

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        block, pieces = self._BLOCK, list[Any]()
        for start in range(0, view.nbytes, block):
            piece = view[start : start + block]
            full = piece.nbytes == block
            pieces += (self._FULL_BLOCK if full else (piece.nbytes << 3).to_bytes(3, "little"), piece)
            if len(pieces) >= 2 * self._BATCH:
                self._member.write_pieces(pieces)
                pieces = []
        if pieces:
            self._member.write_pieces(pieces)
        return view.nbytes


# -- reading -------------------------------------------------------------------------------------------------


class _LimitedReader(io.RawIOBase):
    """Decompressed bytes, refusing more than the declared raw size (a lying size or a zip bomb)."""

    def __init__(self, inner: BinaryIO, limit: int, where: str) -> None:
        self._inner = inner
        self._left = limit
        self._where = where

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        if self._left == 0:
            if self._inner.read(1):
                raise CorruptSnapshotError(f"{self._where}: member decompresses to more than its declared size")
            return 0
        n: int = self._inner.readinto(view[: min(len(view), self._left)])  # type: ignore[attr-defined]
        self._left -= n
        return n


#: The default of ``bucketsnap._values.MAX_MEMBER_SIZE`` (64 GiB), for reads that do not import it.
_MAX_MEMBER_SIZE = 64 * 2**30


def _max_member_size() -> int:
    # _values imports torch, which a verify never needs; its deprecated MAX_MEMBER_SIZE global can only have
    # been raised by code that imported it.
    values = sys.modules.get("bucketsnap._values")
    return int(values.MAX_MEMBER_SIZE) if values is not None else _MAX_MEMBER_SIZE


@contextmanager
def _member_stream(
    read_range: ReadRange, member: MemberInfo, where: str, max_member_size: int | None = None
) -> Iterator[BinaryIO]:
    """The member's payload as a stream; on leaving, refuse a member whose payload was not read to its end."""
    check_member(member, where, max_member_size)
    if member.codec == _frames.CODEC:
        with _frames_stream(read_range, member, where) as stream:
            yield stream
        return
    raw = RangeReader(read_range, member.offset, member.stored_size, where=where, read_ahead=READ_AHEAD)
    try:
        # one frame, read forward: checked against the member's CRC-32 and, compressed, zstd's checksum
        dctx = zstandard.ZstdDecompressor()
        with dctx.stream_reader(raw, read_size=READ_CHUNK, closefd=False) as z:  # type: ignore[arg-type]
            limited = _LimitedReader(z, member.raw_size, where)  # type: ignore[arg-type]
            yield limited  # type: ignore[misc]
            if limited.readinto(bytearray(1)) or limited._left:
                raise CorruptSnapshotError(f"{where}: member size differs from the declared {member.raw_size}")
        crc = raw.finish()
    except zstandard.ZstdError as exc:
        raise CorruptSnapshotError(f"{where}: corrupt zstd data: {exc}") from exc
    finally:
        raw.close()  # cancels the reads still in flight when the consumer stopped early
    if f"{crc:08x}" != member.crc32:
        raise CorruptSnapshotError(f"{where}: checksum mismatch (crc32 {crc:08x}, expected {member.crc32})")


@contextmanager
def _frames_stream(read_range: ReadRange, member: MemberInfo, where: str) -> Iterator[BinaryIO]:
    """A seekable member's whole payload, its frames decoded on the read pool (:mod:`bucketsnap._frame_reader`).

    The frame index (the member's last 32 KiB) is checked against the member's CRC-32 before any frame is
    read; each frame is then checked against the index. A member that fits in those 32 KiB is served from them.
    """
    tail_start, tail = 0, b""
    if member.stored_size <= _frames.TAIL:  # the index read brings the whole member: check all of it first
        tail = read_range(member.offset, member.offset + member.stored_size)
        crc = crc32(tail)
        if len(tail) == member.stored_size and f"{crc:08x}" != member.crc32:
            raise CorruptSnapshotError(f"{where}: checksum mismatch (crc32 {crc:08x}, expected {member.crc32})")
    cached = _cached(read_range, member.offset, tail) if tail else read_range
    index = _frames.read_index(cached, member.offset, member.stored_size, member.raw_size, where=where)
    if not tail:
        tail_start, tail = index.tail
        crc = _frames.member_crc(index)
        if f"{crc:08x}" != member.crc32:
            raise CorruptSnapshotError(
                f"{where}: checksum mismatch (crc32 {crc:08x} of the frame index, expected {member.crc32})"
            )
        cached = _cached(read_range, member.offset + tail_start, tail)
    reader = FramesReader(cached, member.offset, index, 0, member.raw_size, where=where)
    try:
        yield reader  # type: ignore[misc]
        if reader.readinto(bytearray(1)):
            raise CorruptSnapshotError(f"{where}: member size differs from the declared {member.raw_size}")
    finally:
        reader.close()  # cancels the reads still in flight when the consumer stopped early


def _cached(read_range: ReadRange, start: int, data: bytes) -> ReadRange:
    """``read_range``, answering reads within ``[start, start + len(data))`` from ``data``, and reading only the
    bytes before ``start`` of a read that ends within it (the last frames of a member, partly in the index read)."""

    def read(lo: int, hi: int) -> bytes:
        if start <= hi <= start + len(data):
            if lo >= start:
                return data[lo - start : hi - start]
            return read_range(lo, start) + data[: hi - start]
        return read_range(lo, hi)

    into = getattr(read_range, "into", None)  # reads into a buffer (see _frame_reader.reads_into), kept
    if into is not None:

        def read_into(lo: int, buffer: memoryview) -> int:
            hi = lo + buffer.nbytes
            if start <= hi <= start + len(data):
                got = read(lo, hi)
                buffer[: len(got)] = got
                return len(got)
            return int(into(lo, buffer))

        read.into = read_into  # type: ignore[attr-defined]
    return read


def check_member(member: MemberInfo, where: str, max_member_size: int | None = None) -> None:
    """Refuse, before a byte is read, a member of an unknown codec or declaring more than the size limit."""
    if member.codec not in ("zstd", _frames.CODEC):
        raise CorruptSnapshotError(f"{where}: unknown codec {member.codec!r}; upgrade bucketsnap")
    limit = _max_member_size() if max_member_size is None else max_member_size  # read now: it may be set
    if member.raw_size > limit:  # refused before a byte is read: a zip bomb or a lie
        raise CorruptSnapshotError(
            f"{where}: member declares {member.raw_size} bytes decompressed, more than the limit max_member_size = "
            f"{limit} (default MAX_MEMBER_SIZE, 64 GiB); raise it, only for a trusted run, with "
            "SnapshotStore(url, max_member_size=...)"
        )


def load_member(
    read_range: ReadRange,
    member: MemberInfo,
    *,
    where: str,
    map_location: MapLocation = None,
    allow_pickle: bool = False,
    max_member_size: int | None = None,
) -> Any:
    """Decode one member, streaming its byte range; raise CorruptSnapshotError on any mismatch (or a member
    declaring more than ``max_member_size`` bytes decompressed)."""
    if member.pickled and not allow_pickle:
        # Refuse before downloading a byte: this member cannot be restored without unpickling.
        raise UnsafeLoadError(
            f"{where} holds pickled values; unpickling runs code from the snapshot. Pass allow_pickle=True "
            "only if you trust where it came from, or load other keys."
        )
    from bucketsnap._values import decode

    with _member_stream(read_range, member, where, max_member_size) as stream:
        value = decode(
            stream, map_location=map_location, allow_pickle=allow_pickle, where=where, max_size=member.raw_size
        )
    return value


def verify_member(read_range: ReadRange, member: MemberInfo, *, where: str, max_member_size: int | None = None) -> None:
    """Read one member whole, checking its CRC, its zstd checksum and its declared sizes."""
    with _member_stream(read_range, member, where, max_member_size) as stream:
        while stream.read(READ_CHUNK):
            pass


def verify_object(
    read_range: ReadRange,
    size: int,
    checksum: str,
    members: list[MemberInfo],
    *,
    where: str,
    max_member_size: int | None = None,
) -> None:
    """Read a whole object of ``size`` bytes and check its CRC-32 against ``checksum`` (``"crc32:<8 hex>"``),
    checking each of the ``members`` it holds as :func:`verify_member` does.

    Every byte is read once: the bytes around the members (local headers, data descriptors, ``meta.json``, the
    central directory) are read and CRC'd here, and each member's bytes by :func:`verify_member`, which checks
    them against the member's CRC-32; that CRC is then folded into the object's with ``crc32_combine``, which
    gives exactly the CRC-32 of the whole object.

    Raises:
        CorruptSnapshotError: a member, or any other byte of the object, differs from what was committed.
    """
    crc, pos = 0, 0
    for member in sorted(members, key=lambda m: m.offset):
        end = member.offset + member.stored_size
        if member.offset < pos or end > size:
            raise CorruptSnapshotError(
                f"{where}: member {member.name} at bytes {member.offset}-{end} overlaps another member or runs "
                f"past the object's {size} bytes; the manifest's member table is corrupt"
            )
        crc = _crc_of_range(read_range, pos, member.offset, crc, where)
        verify_member(read_range, member, where=f"{where} member {member.name}", max_member_size=max_member_size)
        crc = crc32_combine(crc, int(member.crc32, 16), member.stored_size)  # checked just now
        pos = end
    crc = _crc_of_range(read_range, pos, size, crc, where)
    if f"crc32:{crc:08x}" != checksum:
        raise CorruptSnapshotError(
            f"{where}: checksum mismatch (crc32:{crc:08x} of its {size} bytes, expected {checksum}): a byte outside "
            "the members' data (a zip header, meta.json or the central directory) differs from what was committed"
        )


def _crc_of_range(read_range: ReadRange, start: int, end: int, crc: int, where: str) -> int:
    """``crc`` continued over bytes ``[start, end)``, read in chunks of at most ``READ_CHUNK``."""
    return RangeReader(read_range, start, end - start, where=where, crc=crc).finish()
