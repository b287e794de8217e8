"""The zip container of a snapshot archive: a forward-only writer, and a reader of the central directory.

The writer never seeks, so the same bytes go to a local file or to a multipart upload: a member whose size
is not known up front (every ``<key>.zst``) has a data descriptor after its data, and ZIP64 fields where sizes or
offsets need them. Its data may be handed over as many pieces at once (:meth:`MemberSink.write_pieces`),
which a destination with a ``writev`` method writes with one call (vectored I/O) instead of one per piece.
CRC-32 comes from zlib-ng, several times faster than the standard library's zlib on large buffers.

The writer also keeps the CRC-32 of the whole archive (:attr:`ZipStreamWriter.crc`), which the manifest records
so that ``verify`` covers every byte, not only the members' data. It costs no second pass over the data: the
headers, descriptors and directory are CRC'd as they are written, and each member's CRC, computed anyway for its
zip entry, is folded in with ``crc32_combine`` when the member is closed.

The reader parses the central directory with ranged reads, for tools that only have the archive (``repair``,
SB3 zips); it refuses unsafe member names and offsets outside the archive, and :func:`read_member` reads one
member (STORED or DEFLATED) checked against its CRC-32. :class:`RangeReader` is the one forward reader of a byte
range in ranged requests, with their CRC-32 and, optionally, requests kept in flight ahead of the consumer; the
archive's members and the buffers' chunk objects are both read through it.
"""

from __future__ import annotations

import io
import os
import struct
import threading
import time
import zipfile
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import IO, Any

from zlib_ng.zlib_ng import crc32, crc32_combine

from bucketsnap._pools import Pool
from bucketsnap.errors import CorruptSnapshotError

__all__ = [
    "READ_AHEAD",
    "READ_CHUNK",
    "MemberSink",
    "RangeReader",
    "ReadRange",
    "ZipEntry",
    "ZipStreamWriter",
    "crc32",
    "crc32_combine",
    "data_offset",
    "read_directory",
    "read_member",
]

#: ``read_range(start, end)``: the bytes ``[start, end)`` of one stored object.
ReadRange = Callable[[int, int], bytes]
#: Bytes per ranged request of a :class:`RangeReader`.
READ_CHUNK = 4 * 2**20
#: Ranged reads of ``READ_CHUNK`` bytes a member's reader keeps in flight ahead of the decoder, so a restore
#: from an object store overlaps the requests' latency; it holds at most this many chunks in memory.
READ_AHEAD = 8

_EOCD = struct.Struct("<4s4H2LH")
_EOCD64_LOC = struct.Struct("<4sLQL")
_EOCD64 = struct.Struct("<4sQ2H2L4Q")
_CDIR = struct.Struct("<4s6H3L5H2L")
_LOCAL = struct.Struct("<4s5H3L2H")
_DESCRIPTOR = struct.Struct("<4sLLL")
_DESCRIPTOR64 = struct.Struct("<4sLQQ")
_TAIL = 64 * 1024
_MAX32 = 0xFFFFFFFF
_VERSION, _VERSION64 = 20, 45
_MADE_BY_UNIX = 3 << 8
_FLAG_DESCRIPTOR, _FLAG_UTF8 = 0x08, 0x800
_FILE_MODE = 0o644 << 16


# -- writing -------------------------------------------------------------------------------------------------


@dataclass
class _Written:
    name: bytes
    flags: int
    header_offset: int
    crc: int
    size: int
    zip64: bool


class _Output:
    """The destination, counting the bytes written; pieces go out in one ``writev`` call where it has one.

    ``crc`` is the CRC-32 of the bytes before ``crc_pos``: :meth:`write` keeps it current, while member data
    (:meth:`write_pieces`, whose CRC its :class:`MemberSink` computes) is folded in by :meth:`add_crc`.
    """

    def __init__(self, dest: IO[bytes]) -> None:
        self._dest = dest
        self._writev: Callable[[Sequence[Any]], int] | None = getattr(dest, "writev", None)
        self.pos = 0
        self.crc = 0
        self.crc_pos = 0

    def write(self, data: Any) -> None:
        self._dest.write(data)
        self.crc = crc32(data, self.crc)
        self.pos += memoryview(data).nbytes
        self.crc_pos = self.pos

    def add_crc(self, crc: int, size: int) -> None:
        """Fold in the CRC-32 of the ``size`` bytes written by :meth:`write_pieces` since the last write."""
        if self.crc_pos + size != self.pos:
            raise AssertionError(f"archive CRC covers {self.crc_pos} + {size} bytes of {self.pos} written")
        self.crc = crc32_combine(self.crc, crc, size)
        self.crc_pos = self.pos

    def write_pieces(self, pieces: Sequence[Any]) -> int:
        if self._writev is not None:
            n = self._writev(pieces)
        else:
            n = 0
            for piece in pieces:
                self._dest.write(piece)
                n += memoryview(piece).nbytes
        self.pos += n
        return n


class MemberSink:
    """The data of one member being written: counts its size and CRC-32 as the bytes go out."""

    def __init__(self, out: _Output) -> None:
        self._out = out
        self.crc = 0
        self.size = 0

    def write(self, data: Any) -> int:
        """Write one piece; returns its length."""
        return self.write_pieces((data,))

    def write_pieces(self, pieces: Sequence[Any], *, crc: int | None = None) -> int:
        """Write several pieces, in order, with as few calls to the destination as it allows.

        ``crc``: the pieces' CRC-32, where the caller computed it already (folded in, not computed again).
        """
        if crc is None:
            total = self.crc
            for piece in pieces:
                total = crc32(piece, total)
        n = self._out.write_pieces(pieces)
        self.crc = total if crc is None else crc32_combine(self.crc, crc, n)
        self.size += n
        return n

    def tell(self) -> int:
        """The offset in the archive of the next byte written."""
        return self._out.pos


class ZipStreamWriter:
    """Writes a zip archive to ``dest`` without seeking: :meth:`open_member` or :meth:`add_bytes`, then
    :meth:`close`. Every member is STORED (its data is already compressed, or meant to be read as it is)."""

    def __init__(self, dest: IO[bytes]) -> None:
        self._out = _Output(dest)
        self._entries: list[_Written] = []
        self._names: set[str] = set()
        now = time.gmtime()
        self._time = (now.tm_hour << 11) | (now.tm_min << 5) | (now.tm_sec // 2)
        self._date = ((max(now.tm_year, 1980) - 1980) << 9) | (now.tm_mon << 5) | now.tm_mday

    def open_member(self, name: str, *, zip64: bool) -> MemberSink:
        """Write ``name``'s local header; write its data to the returned sink, then :meth:`close_member` it.

        ``zip64``: the member may reach 4 GiB (its sizes are then 8 bytes wide); a member that turns out
        bigger without it raises ValueError at :meth:`close_member`.
        """
        raw_name, flags = self._check_name(name)
        flags |= _FLAG_DESCRIPTOR
        extra = struct.pack("<2H2Q", 1, 16, 0, 0) if zip64 else b""
        size_field = _MAX32 if zip64 else 0
        entry = _Written(raw_name, flags, self._out.pos, 0, 0, zip64)
        self._out.write(self._local_header(entry, size_field, extra) + raw_name + extra)
        self._entries.append(entry)
        return MemberSink(self._out)

    def close_member(self, sink: MemberSink) -> None:
        """Write the data descriptor of the member last opened."""
        entry = self._entries[-1]
        entry.crc, entry.size = sink.crc, sink.size
        self._out.add_crc(sink.crc, sink.size)
        if entry.zip64:
            self._out.write(_DESCRIPTOR64.pack(b"PK\x07\x08", entry.crc, entry.size, entry.size))
        elif entry.size >= _MAX32:
            raise ValueError(f"zip member {entry.name.decode()} reached {entry.size} bytes; open it with zip64=True")
        else:
            self._out.write(_DESCRIPTOR.pack(b"PK\x07\x08", entry.crc, entry.size, entry.size))

    def add_bytes(self, name: str, data: bytes) -> None:
        """Write a whole member whose bytes are known (sizes and CRC go in its local header)."""
        raw_name, flags = self._check_name(name)
        entry = _Written(raw_name, flags, self._out.pos, crc32(data), len(data), len(data) >= _MAX32)
        if entry.zip64:
            raise ValueError(f"zip member {name} of {len(data)} bytes is too big for add_bytes")
        self._out.write(self._local_header(entry, entry.size, b"") + raw_name)
        self._out.write(data)
        self._entries.append(entry)

    def close(self) -> int:
        """Write the central directory and the end records; return the archive's size."""
        cd_offset = self._out.pos
        for entry in self._entries:
            self._out.write(self._directory_entry(entry))
        count, cd_size, cd_end = len(self._entries), self._out.pos - cd_offset, self._out.pos
        if count >= 0xFFFF or cd_size >= _MAX32 or cd_offset >= _MAX32:
            self._out.write(
                _EOCD64.pack(
                    b"PK\x06\x06", 44, _MADE_BY_UNIX | _VERSION64, _VERSION64, 0, 0, count, count, cd_size, cd_offset
                )
                + _EOCD64_LOC.pack(b"PK\x06\x07", 0, cd_end, 1)
            )
        small = min(count, 0xFFFF)
        self._out.write(_EOCD.pack(b"PK\x05\x06", 0, 0, small, small, min(cd_size, _MAX32), min(cd_offset, _MAX32), 0))
        return self._out.pos

    @property
    def crc(self) -> int:
        """The CRC-32 of every byte of the archive written so far (the whole archive after :meth:`close`)."""
        if self._out.crc_pos != self._out.pos:
            raise ValueError("a member is open: the archive's CRC-32 is known once it is closed")
        return self._out.crc

    def _check_name(self, name: str) -> tuple[bytes, int]:
        if name in self._names:
            raise ValueError(f"duplicate zip member {name!r}")
        self._names.add(name)
        return name.encode(), 0 if name.isascii() else _FLAG_UTF8

    def _local_header(self, entry: _Written, size: int, extra: bytes) -> bytes:
        version = _VERSION64 if entry.zip64 else _VERSION
        return _LOCAL.pack(
            b"PK\x03\x04", version, entry.flags, 0, self._time, self._date, entry.crc, size, size,
            len(entry.name), len(extra),
        )  # fmt: skip

    def _directory_entry(self, entry: _Written) -> bytes:
        wide = [v for v in (entry.size, entry.size, entry.header_offset) if v >= _MAX32]
        extra = struct.pack(f"<2H{len(wide)}Q", 1, 8 * len(wide), *wide) if wide else b""
        version = _VERSION64 if entry.zip64 or wide else _VERSION
        size, offset = min(entry.size, _MAX32), min(entry.header_offset, _MAX32)
        header = _CDIR.pack(
            b"PK\x01\x02", _MADE_BY_UNIX | version, version, entry.flags, 0, self._time, self._date, entry.crc,
            size, size, len(entry.name), len(extra), 0, 0, 0, _FILE_MODE, offset,
        )  # fmt: skip
        return header + entry.name + extra


# -- reading the central directory ---------------------------------------------------------------------------


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


def read_member(
    read_range: ReadRange,
    entry: ZipEntry,
    size: int,
    *,
    where: str,
    methods: tuple[int, ...] = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED),
) -> bytes:
    """The bytes of one member of a zip of ``size`` bytes, inflated if DEFLATED, checked against their CRC-32.

    Args:
        methods: the zip methods accepted (a member that a writer stores, such as ``meta.json``, passes
            ``(zipfile.ZIP_STORED,)``).

    Raises:
        CorruptSnapshotError: a bad local header, a method not in ``methods``, or a CRC-32 mismatch.
    """
    start = data_offset(read_range, entry, size, where=where)
    raw = read_range(start, start + entry.stored_size)
    if entry.method not in methods:
        names = " or ".join(_METHODS.get(m, str(m)) for m in methods)
        raise CorruptSnapshotError(f"{where}: member {entry.name!r} uses zip method {entry.method}, not {names}")
    if entry.method == zipfile.ZIP_DEFLATED:
        try:
            raw = zlib.decompress(raw, -15)
        except zlib.error as exc:
            raise CorruptSnapshotError(f"{where}: member {entry.name!r} does not inflate: {exc}") from exc
    if crc32(raw) != entry.crc32:  # a flipped byte in a metric would otherwise pass
        raise CorruptSnapshotError(f"{where}: member {entry.name!r} does not match the CRC-32 in the zip directory")
    return raw


_METHODS = {zipfile.ZIP_STORED: "STORED (0)", zipfile.ZIP_DEFLATED: "DEFLATED (8)"}


# -- reading a byte range ------------------------------------------------------------------------------------

_pool_lock = threading.Lock()
_read_pool: Pool | None = None


def _prefetch_pool() -> Pool:
    global _read_pool
    with _pool_lock:
        if _read_pool is None:
            _read_pool = Pool(4 * READ_AHEAD, thread_name_prefix="bucketsnap-read")
        return _read_pool


def _forget_pool_after_fork() -> None:
    """In a forked child: a pool of its own. The parent's threads are not in the child, but the executor counts
    them as idle and would start none for the child's reads, which then waited forever (found by review)."""
    global _read_pool, _pool_lock
    _read_pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


_EMPTY = memoryview(b"")


class RangeReader(io.RawIOBase):
    """The bytes ``[start, start + length)`` of a stored object, read forward in requests of ``READ_CHUNK``.

    Each request must return exactly the bytes asked for, or the read raises CorruptSnapshotError
    ("truncated"); :attr:`crc` is the CRC-32 of every byte read so far, and :meth:`finish` reads the rest and
    returns it. With ``read_ahead``, a range larger than one request is fetched by up to that many concurrent
    requests ahead of the consumer (never past its end, so a restore reads only what it asks for).

    Args:
        crc: a CRC-32 to continue (of the bytes before ``start``, when a caller checks a whole object).
    """

    def __init__(
        self, read_range: ReadRange, start: int, length: int, *, where: str, read_ahead: int = 0, crc: int = 0
    ) -> None:
        self._read_range = read_range
        self._pos = start
        self._next = start  # the first byte not yet requested
        self._pending: deque[Future[bytes]] = deque()
        self._end = start + length
        self._read_ahead = read_ahead
        self._where = where
        self._buf = _EMPTY
        self.crc = crc

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
            self.crc = crc32(data, self.crc)
            self._buf = memoryview(data)
        view = memoryview(b).cast("B")
        n = min(len(view), len(self._buf))
        view[:n] = self._buf[:n]
        # an empty slice would still hold the request's bytes until the next one: let them go now
        self._buf = self._buf[n:] if n < len(self._buf) else _EMPTY
        return n

    def _fetch(self, n: int) -> bytes:
        """The next ``n`` bytes, keeping up to ``read_ahead`` reads in flight when there is more to come."""
        if not self._pending and (self._read_ahead < 1 or self._pos + n >= self._end):
            self._next = self._pos + n
            return self._read_range(self._pos, self._pos + n)  # no thread needed: the last chunk, or no read-ahead
        pool = _prefetch_pool()
        while len(self._pending) < self._read_ahead and self._next < self._end:
            size = min(READ_CHUNK, self._end - self._next)
            self._pending.append(pool.submit(self._read_range, self._next, self._next + size))
            self._next += size
        return self._pending.popleft().result()

    def close(self) -> None:
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        super().close()

    def finish(self) -> int:
        """Consume what is left; return the CRC-32 of everything read."""
        buffer = bytearray(min(READ_CHUNK, self._end - self._pos + len(self._buf)) or 1)  # once, not per chunk
        while self.readinto(buffer):
            pass
        return self.crc
