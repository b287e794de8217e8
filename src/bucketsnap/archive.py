"""The snapshot archive: a standard zip whose members are independent zstd frames, plus ``meta.json``.

Layout (``unzip -l`` lists it; ``unzip -p snap.zip policy.zst | zstd -d`` recovers one member by hand)::

    <key>.zst     one per top-level key of the saved state, zip method STORED, holding one zstd frame
                  of the payload described in :mod:`bucketsnap.values`: compressed with zstd's content
                  checksum, or, for incompressible members, stored as raw zstd blocks (see ``_StoredFrame``)
    ...
    meta.json     format version, library versions, itr, creation time, metrics, and per member its
                  codec, offset, raw and stored sizes and CRC-32

Members are written through a forward-only stream, so every entry uses a zip data descriptor and ZIP64
sizes where needed; the same bytes come out whether the destination is a local file or a multipart upload.
Each member's data offset is recorded in ``meta.json`` and in the manifest, so a reader fetches one member with
one ranged request and never reads the central directory; :func:`read_directory` reads it for tools that only
have the archive.

This module reads and writes file objects and byte ranges only; it knows no URLs.
"""

from __future__ import annotations

import io
import json
import struct
import threading
import time
import zipfile
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any, BinaryIO

import zstandard

from bucketsnap import values as _values
from bucketsnap.errors import CorruptSnapshotError, UnsafeLoadError
from bucketsnap.info import MemberInfo
from bucketsnap.values import EncodedValue, MapLocation, decode, encode

__all__ = [
    "FORMAT_VERSION",
    "META_NAME",
    "ArchiveWriter",
    "ZipEntry",
    "load_member",
    "member_name",
    "read_directory",
    "verify_member",
]

FORMAT_VERSION = 1
META_NAME = "meta.json"
READ_CHUNK = 4 * 2**20
#: Ranged reads of ``READ_CHUNK`` bytes a member's reader keeps in flight ahead of the decoder, so a restore
#: from an object store overlaps the requests' latency; it holds at most this many chunks in memory.
READ_AHEAD = 8
_WRITE_CHUNK = 2**20
#: Members whose sample does not compress below this ratio are stored in raw zstd blocks. Float weights and
#: Adam moments compress to about 0.9 at level 3, at 200-400 MB/s on one core: 2-5 times the cost of the
#: write, to save a tenth of the bytes. Compression pays when it at least halves a member (frames, masks,
#: sparse or repetitive arrays compress 10 to 500 times).
INCOMPRESSIBLE_RATIO = 0.5
_SAMPLE = 256 * 1024


def member_name(key: str) -> str:
    return f"{key}.zst"


class _ForwardStream(io.RawIOBase):
    """Wraps a destination as a non-seekable, position-counting stream, so zipfile writes data descriptors."""

    def __init__(self, dest: IO[bytes]) -> None:
        self.dest = dest
        self.pos = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self.pos

    def seek(self, *_: Any) -> int:
        raise io.UnsupportedOperation("forward-only stream")

    def write(self, b: Any) -> int:
        n = memoryview(b).nbytes
        self.dest.write(b)
        self.pos += n
        return n

    def flush(self) -> None:
        pass


class ArchiveWriter:
    """Writes one snapshot archive to a binary stream: :meth:`add` each key, then :meth:`finish`.

    Args:
        dest: a writable binary file object (not closed by the writer).
        level: zstd level for compressible members.
        threads: zstd worker threads (0: compress in the calling thread; -1: one per core).
        progress: called with each count of uncompressed bytes as it is written.
    """

    def __init__(
        self,
        dest: IO[bytes],
        *,
        level: int = 3,
        threads: int = 0,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self._out = _ForwardStream(dest)
        self._progress = progress
        self._zip = zipfile.ZipFile(self._out, "w", zipfile.ZIP_STORED, allowZip64=True)  # type: ignore[arg-type]
        self._level = level
        self._threads = threads
        self._date_time = time.gmtime()[:6]
        self.members: dict[str, MemberInfo] = {}

    def add(self, key: str, value: Any) -> MemberInfo:
        """Encode ``value`` and write it as member ``<key>.zst``."""
        return self.add_encoded(key, encode(value))

    def add_encoded(self, key: str, encoded: EncodedValue) -> MemberInfo:
        name = member_name(key)
        zinfo = zipfile.ZipInfo(name, date_time=self._date_time)  # type: ignore[arg-type]
        zinfo.compress_type = zipfile.ZIP_STORED
        zinfo.external_attr = 0o644 << 16
        raw_size = encoded.raw_size
        level = _choose_level(encoded, self._level)
        with self._zip.open(zinfo, "w", force_zip64=raw_size > 2**31) as member:
            offset = self._out.tell()
            with _frame_writer(member, level, raw_size, self._threads) as zw:
                for chunk in encoded.chunks():
                    if self._progress is None:
                        zw.write(chunk)
                        continue
                    view = memoryview(chunk).cast("B")
                    for start in range(0, view.nbytes, READ_CHUNK):  # a tensor is one chunk: report in slices
                        zw.write(view[start : start + READ_CHUNK])
                        self._progress(min(READ_CHUNK, view.nbytes - start))
        info = MemberInfo(
            name=name,
            offset=offset,
            stored_size=zinfo.compress_size,
            raw_size=raw_size,
            crc32=f"{zinfo.CRC:08x}",
            pickled=encoded.pickled,
        )
        self.members[key] = info
        return info

    def abandon(self) -> None:
        """Give up on a failed archive: nothing more is written to the destination, not even by the garbage
        collector finalising the zip (which would write a central directory into a closed or aborted file)."""
        self._zip.fp = None  # zipfile's close() returns at once without an fp

    def finish(self, meta: dict[str, Any]) -> int:
        """Write ``meta.json`` (with the member table added) and the central directory; return the size."""
        meta = {**meta, "format_version": FORMAT_VERSION, "members": {k: m.to_json() for k, m in self.members.items()}}
        zinfo = zipfile.ZipInfo(META_NAME, date_time=self._date_time)  # type: ignore[arg-type]
        zinfo.external_attr = 0o644 << 16
        self._zip.writestr(zinfo, json.dumps(meta, indent=1, sort_keys=True))
        self._zip.close()
        return self._out.tell()


def _choose_level(encoded: EncodedValue, level: int) -> int | None:
    """Sample the largest buffers; if they do not compress, return None: store them in raw zstd blocks."""
    big = sorted((b for b in encoded.buffers if b.nbytes >= _SAMPLE), key=lambda b: -b.nbytes)[:4]
    if level < 0 or not big:
        return level
    sample = b"".join(bytes(b.cast("B")[(b.nbytes - _SAMPLE) // 2 :][:_SAMPLE]) for b in big)
    ratio = len(zstandard.ZstdCompressor(level=1).compress(sample)) / len(sample)
    return None if ratio > INCOMPRESSIBLE_RATIO else level


def _frame_writer(member: IO[bytes], level: int | None, raw_size: int, threads: int) -> Any:
    """A writer of one zstd frame into ``member``: compressed at ``level``, or stored when ``level`` is None."""
    if level is None:
        return _StoredFrame(member, raw_size)
    cctx = zstandard.ZstdCompressor(level=level, threads=threads, write_checksum=True)
    return cctx.stream_writer(member, size=raw_size, write_size=_WRITE_CHUNK, closefd=False)


class _StoredFrame:
    """A zstd frame of raw (uncompressed) blocks, written straight from the caller's buffers.

    For incompressible members (float weights): even zstd's fastest level copies every byte through its
    buffers and hashes it, which costs as much as the disk write; a stored frame costs one CRC-32 pass (the
    zip's, which also covers these bytes) and no copy, and any zstd decoder reads it. Layout (RFC 8878): magic,
    a header with the 8-byte content size, a 128 KiB window and no content checksum, raw blocks of at most
    128 KiB, and an empty last block.
    """

    _HEADER = struct.Struct("<IBBQ")
    _BLOCK = 128 * 1024

    def __init__(self, member: IO[bytes], raw_size: int) -> None:
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
        block = self._BLOCK
        for start in range(0, view.nbytes, block):
            piece = view[start : start + block]
            self._member.write((piece.nbytes << 3).to_bytes(3, "little"))  # raw block, not last
            self._member.write(piece)
        return view.nbytes


# -- reading -------------------------------------------------------------------------------------------------

ReadRange = Callable[[int, int], bytes]


_pool_lock = threading.Lock()
_read_pool: ThreadPoolExecutor | None = None


def _prefetch_pool() -> ThreadPoolExecutor:
    global _read_pool
    with _pool_lock:
        if _read_pool is None:
            _read_pool = ThreadPoolExecutor(4 * READ_AHEAD, thread_name_prefix="bucketsnap-read")
        return _read_pool


class _RangeReader(io.RawIOBase):
    """The stored bytes ``[start, start + length)`` of an archive, fetched in chunks, CRC-checked at the end.

    A member larger than one chunk is fetched by up to :data:`READ_AHEAD` concurrent ranged reads ahead of
    the consumer, never past the member's end (so a restore reads only the members it asks for).
    """

    def __init__(self, read_range: ReadRange, start: int, length: int, crc32: str, where: str) -> None:
        self._read_range = read_range
        self._pos = start
        self._next = start  # the first byte not yet requested
        self._pending: deque[Future[bytes]] = deque()
        self._end = start + length
        self._crc = 0
        self._expected = crc32
        self._where = where
        self._buf = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if not self._buf:
            if self._pos >= self._end:
                return 0
            n = min(READ_CHUNK, self._end - self._pos)
            data = self._fetch(n)
            if len(data) != n:
                raise CorruptSnapshotError(
                    f"{self._where}: truncated: wanted bytes {self._pos}-{self._pos + n}, got {len(data)}"
                )
            self._pos += n
            self._crc = zlib.crc32(data, self._crc)
            self._buf = memoryview(data)
        view = memoryview(b).cast("B")
        n = min(len(view), len(self._buf))
        view[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def _fetch(self, n: int) -> bytes:
        """The next ``n`` bytes, keeping up to READ_AHEAD chunk reads in flight when there is more to come."""
        if not self._pending and self._pos + n >= self._end:
            self._next = self._end
            return self._read_range(self._pos, self._end)  # the last (or only) chunk: no thread needed
        pool = _prefetch_pool()
        while len(self._pending) < READ_AHEAD and self._next < self._end:
            size = min(READ_CHUNK, self._end - self._next)
            self._pending.append(pool.submit(self._read_range, self._next, self._next + size))
            self._next += size
        return self._pending.popleft().result()

    def close(self) -> None:
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        super().close()

    def finish(self) -> None:
        """Consume what is left and check the CRC of everything read."""
        buffer = bytearray(min(READ_CHUNK, self._end - self._pos + len(self._buf)) or 1)  # once, not per chunk
        while self.readinto(buffer):
            pass
        if f"{self._crc:08x}" != self._expected:
            raise CorruptSnapshotError(
                f"{self._where}: checksum mismatch (crc32 {self._crc:08x}, expected {self._expected})"
            )


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


@contextmanager
def _member_stream(read_range: ReadRange, member: MemberInfo, where: str) -> Iterator[BinaryIO]:
    if member.codec != "zstd":
        raise CorruptSnapshotError(f"{where}: unknown codec {member.codec!r}; upgrade bucketsnap")
    if member.raw_size > _values.MAX_MEMBER_SIZE:  # refused before a byte is read: a zip bomb or a lie
        raise CorruptSnapshotError(
            f"{where}: member declares {member.raw_size} bytes decompressed, more than the limit "
            f"bucketsnap.values.MAX_MEMBER_SIZE = {_values.MAX_MEMBER_SIZE}; raise it only for a trusted snapshot"
        )
    raw = _RangeReader(read_range, member.offset, member.stored_size, member.crc32, where)
    try:
        with zstandard.ZstdDecompressor().stream_reader(raw, read_size=READ_CHUNK, closefd=False) as z:  # type: ignore[arg-type]
            limited = _LimitedReader(z, member.raw_size, where)  # type: ignore[arg-type]
            yield limited  # type: ignore[misc]
            if limited.readinto(bytearray(1)) or limited._left:
                raise CorruptSnapshotError(f"{where}: member size differs from the declared {member.raw_size}")
        raw.finish()
    except zstandard.ZstdError as exc:
        raise CorruptSnapshotError(f"{where}: corrupt zstd data: {exc}") from exc


def load_member(
    read_range: ReadRange,
    member: MemberInfo,
    *,
    where: str,
    map_location: MapLocation = None,
    allow_pickle: bool = False,
) -> Any:
    """Decode one member, streaming its byte range; raise CorruptSnapshotError on any mismatch."""
    if member.pickled and not allow_pickle:
        # Refuse before downloading a byte: this member cannot be restored without unpickling.
        raise UnsafeLoadError(
            f"{where} holds pickled values; unpickling runs code from the snapshot. Pass allow_pickle=True "
            "only if you trust where it came from, or load other keys."
        )
    with _member_stream(read_range, member, where) as stream:
        value = decode(
            stream, map_location=map_location, allow_pickle=allow_pickle, where=where, max_size=member.raw_size
        )
    return value


def verify_member(read_range: ReadRange, member: MemberInfo, *, where: str) -> None:
    """Read one member whole, checking its CRC, its zstd checksum and its declared sizes."""
    with _member_stream(read_range, member, where) as stream:
        while stream.read(READ_CHUNK):
            pass


# -- the central directory, for readers that only have the archive -------------------------------------------

_EOCD = struct.Struct("<4s4H2LH")
_EOCD64_LOC = struct.Struct("<4sLQL")
_EOCD64 = struct.Struct("<4sQ2H2L4Q")
_CDIR = struct.Struct("<4s6H3L5H2L")
_LOCAL = struct.Struct("<4s5H3L2H")
_TAIL = 64 * 1024


@dataclass(frozen=True)
class ZipEntry:
    """A central directory entry: where a member's local header is and how big its data is."""

    name: str
    header_offset: int
    stored_size: int
    raw_size: int
    crc32: int
    method: int


def read_directory(read_range: ReadRange, size: int, *, where: str) -> dict[str, ZipEntry]:
    """Parse the central directory of a zip of ``size`` bytes with ranged reads.

    Raises:
        CorruptSnapshotError: not a zip, truncated, unsafe or duplicate member names, out-of-range offsets.
    """
    if size < _EOCD.size:
        raise CorruptSnapshotError(f"{where}: {size} bytes is too small to be a zip archive")
    tail_start = max(0, size - _TAIL - _EOCD.size)
    tail = read_range(tail_start, size)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < _EOCD.size:
        raise CorruptSnapshotError(f"{where}: no zip end-of-central-directory record (truncated or not a zip)")
    _, _, _, _, count, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, at)
    loc = at - _EOCD64_LOC.size
    if loc >= 0 and tail[loc : loc + 4] == b"PK\x06\x07":
        _, _, eocd64_offset, _ = _EOCD64_LOC.unpack_from(tail, loc)
        rec = _read_checked(read_range, eocd64_offset, _EOCD64.size, size, where)
        if rec[:4] != b"PK\x06\x06":
            raise CorruptSnapshotError(f"{where}: bad ZIP64 end-of-central-directory record")
        _, _, _, _, _, _, _, count, cd_size, cd_offset = _EOCD64.unpack(rec)
    cdir = _read_checked(read_range, cd_offset, cd_size, size, where)
    entries: dict[str, ZipEntry] = {}
    pos = 0
    for _ in range(count):
        if cdir[pos : pos + 4] != b"PK\x01\x02" or pos + _CDIR.size > len(cdir):
            raise CorruptSnapshotError(f"{where}: bad central directory entry at {cd_offset + pos}")
        fields = _CDIR.unpack_from(cdir, pos)
        method, crc, csize, usize, nlen, elen, clen = fields[4], fields[7], fields[8], fields[9], *fields[10:13]
        offset = fields[16]
        raw_name = cdir[pos + _CDIR.size : pos + _CDIR.size + nlen]
        extra = cdir[pos + _CDIR.size + nlen : pos + _CDIR.size + nlen + elen]
        usize, csize, offset = _zip64_values(extra, usize, csize, offset)
        name = _safe_name(raw_name, where)
        if name in entries:
            raise CorruptSnapshotError(f"{where}: duplicate member name {name!r}")
        if offset + _LOCAL.size + csize > size:
            raise CorruptSnapshotError(f"{where}: member {name!r} extends past the end of the archive")
        entries[name] = ZipEntry(name, offset, csize, usize, crc, method)
        pos += _CDIR.size + nlen + elen + clen
    return entries


def data_offset(read_range: ReadRange, entry: ZipEntry, size: int, *, where: str) -> int:
    """The offset of an entry's data, read from its local header."""
    header = _read_checked(read_range, entry.header_offset, _LOCAL.size, size, where)
    fields = _LOCAL.unpack(header)
    if fields[0] != b"PK\x03\x04":
        raise CorruptSnapshotError(f"{where}: bad local header for {entry.name!r}")
    return entry.header_offset + _LOCAL.size + int(fields[-2]) + int(fields[-1])


def _read_checked(read_range: ReadRange, start: int, length: int, size: int, where: str) -> bytes:
    if start < 0 or length < 0 or start + length > size:
        raise CorruptSnapshotError(f"{where}: zip structure points outside the archive ({start}+{length} > {size})")
    data = read_range(start, start + length)
    if len(data) != length:
        raise CorruptSnapshotError(f"{where}: truncated archive")
    return data


def _zip64_values(extra: bytes, usize: int, csize: int, offset: int) -> tuple[int, int, int]:
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<2H", extra, pos)
        if tag == 1:
            body = extra[pos + 4 : pos + 4 + length]
            values = list(struct.unpack_from(f"<{len(body) // 8}Q", body))
            if usize == 0xFFFFFFFF and values:
                usize = values.pop(0)
            if csize == 0xFFFFFFFF and values:
                csize = values.pop(0)
            if offset == 0xFFFFFFFF and values:
                offset = values.pop(0)
        pos += 4 + length
    return usize, csize, offset


def _safe_name(raw: bytes, where: str) -> str:
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptSnapshotError(f"{where}: member name is not UTF-8") from exc
    parts = name.replace("\\", "/").split("/")
    if not name or "\x00" in name or name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
        raise CorruptSnapshotError(f"{where}: unsafe member name {name!r}")
    return name
