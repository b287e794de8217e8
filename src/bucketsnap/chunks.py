"""Chunked arrays: rows of equal-length arrays stored as content-addressed zstd objects shared by snapshots.

A replay buffer is mostly a few big arrays whose rows are transitions. Saving it as one member would rewrite
gigabytes for every thousand new transitions; instead its rows are cut into chunks of a fixed number of rows,
and each chunk is stored once, as its own object::

    chunks/<sha256 of the chunk's raw bytes>.zst    one zstd frame (content size and checksum included) of
                                                    the chunk's rows of every field, field after field

The snapshot's member for the buffer holds only the chunk table (ids, row counts, sizes) and the buffer's
counters; the snapshot's ``refs`` list the chunk objects, so gc and delete keep a chunk while any committed
snapshot refers to it. A save hashes every chunk (sha256, about 1.5 GB/s per core, on up to 4 threads) and
compresses and uploads only the chunks whose id is not stored yet: the chunks that changed since the last
save, usually one or two per thousand transitions.

Trade-off: a chunk is addressed by its content, so nothing needs to track which rows changed (SB3's buffers
cannot tell), at the price of reading the whole buffer once per save to hash it. A restore streams one chunk
at a time with ranged reads straight into the destination arrays, and checks each chunk's size, zstd checksum
and sha256 against its id.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import zstandard

from bucketsnap.errors import CorruptSnapshotError, SnapshotNotFoundError, StorageError, redact
from bucketsnap.storage import Storage

__all__ = ["CHUNK_DIR", "DEFAULT_CHUNK_BYTES", "TABLE_FORMAT", "ChunkedArrays", "chunk_path", "read_chunks"]

CHUNK_DIR = "chunks"
#: Threads hashing a buffer's chunks on save, one per core up to 4: a save of a large buffer whose chunks are
#: mostly stored already costs little but these hashes (sha256: about 1.5 GB/s per core here).
HASH_THREADS = max(1, min(4, os.cpu_count() or 1))
TABLE_FORMAT = "bucketsnap.chunked/1"
#: Raw bytes per chunk that the default number of rows per chunk aims at: big enough for few requests and good
#: compression, small enough that a restore's extra memory stays modest and a save after a few thousand
#: transitions rewrites little.
DEFAULT_CHUNK_BYTES = 32 * 2**20
_READ_SIZE = 4 * 2**20
_CHUNK_ID = re.compile(r"[0-9a-f]{64}")


def chunk_path(chunk_id: str) -> str:
    """The object path, relative to the run, of chunk ``chunk_id``."""
    return f"{CHUNK_DIR}/{chunk_id}.zst"


@dataclass(frozen=True)
class _Field:
    name: str
    dtype: np.dtype[Any]
    row_shape: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize


class ChunkedArrays:
    """Rows ``[0, rows)`` of arrays that share their first axis, to be saved as content-addressed chunks.

    Pass one as a value of the state given to :meth:`SnapshotStore.save` (it implements
    :class:`~bucketsnap.store.ExternalValue`); the member holds the chunk table and ``attrs``.

    Args:
        arrays: field name -> array; rows are along the first axis; only the first ``rows`` rows are saved.
        rows: how many rows to save.
        kind: what the arrays are (e.g. ``"sb3.ReplayBuffer"``), checked on restore.
        attrs: JSON-like counters saved with the table (position, full flag...).
        chunk_rows: rows per chunk; by default as many as fit in :data:`DEFAULT_CHUNK_BYTES`.
        level: zstd compression level of the chunks.
    """

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray],
        rows: int,
        *,
        kind: str,
        attrs: Mapping[str, Any] | None = None,
        chunk_rows: int | None = None,
        level: int = 3,
    ) -> None:
        if not arrays:
            raise ValueError("a chunked value needs at least one array")
        self.arrays = {name: _as_rows(name, a, rows) for name, a in arrays.items()}
        self.fields = [_Field(name, a.dtype, tuple(a.shape[1:])) for name, a in self.arrays.items()]
        self.rows = rows
        self.kind = kind
        self.attrs = dict(attrs or {})
        row_bytes = max(1, sum(f.row_bytes for f in self.fields))
        self.chunk_rows = chunk_rows if chunk_rows is not None else max(1, DEFAULT_CHUNK_BYTES // row_bytes)
        if self.chunk_rows < 1:
            raise ValueError(f"chunk_rows must be at least 1, not {chunk_rows}")
        self.level = level

    def __repr__(self) -> str:
        return f"ChunkedArrays(kind={self.kind!r}, rows={self.rows}, chunk_rows={self.chunk_rows})"

    def host_copy(self) -> ChunkedArrays:
        """A private copy of the saved rows, for a background save."""
        copies = {name: np.array(a[: self.rows], copy=True) for name, a in self.arrays.items()}
        return ChunkedArrays(
            copies, self.rows, kind=self.kind, attrs=self.attrs, chunk_rows=self.chunk_rows, level=self.level
        )

    def write_objects(self, storage: Storage) -> tuple[dict[str, Any], list[str]]:
        """Write the chunks not stored yet; return the chunk table and the chunk paths."""
        existing = _stored_chunks(storage)
        chunks: list[dict[str, Any]] = []
        cctx = zstandard.ZstdCompressor(level=self.level, write_checksum=True, write_content_size=True)
        bounds = [(a, min(a + self.chunk_rows, self.rows)) for a in range(0, self.rows, self.chunk_rows)]
        with ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="bucketsnap-sha256") as pool:
            # Hashing runs ahead in other threads (hashlib releases the GIL) while new chunks compress here.
            digests = [pool.submit(lambda a, b: _digest(self._views(a, b)), a, b) for a, b in bounds]
            for (start, end), digest in zip(bounds, digests, strict=True):
                chunk_id = digest.result()
                raw_size = (end - start) * sum(f.row_bytes for f in self.fields)
                stored = existing.get(f"{chunk_id}.zst")
                if stored is None:
                    chunk_views = self._views(start, end)
                    with storage.write(chunk_path(chunk_id)) as f:
                        counting = _CountingWriter(f)
                        with cctx.stream_writer(counting, size=raw_size, closefd=False) as zw:  # type: ignore[arg-type]
                            for view in chunk_views:
                                zw.write(view)
                    stored = existing[f"{chunk_id}.zst"] = counting.count
                chunks.append({"id": chunk_id, "rows": end - start, "raw_size": raw_size, "stored_size": stored})
        table = {
            "format": TABLE_FORMAT,
            "kind": self.kind,
            "rows": self.rows,
            "chunk_rows": self.chunk_rows,
            "fields": [
                {"name": f.name, "dtype": np.lib.format.dtype_to_descr(f.dtype), "shape": list(f.row_shape)}
                for f in self.fields
            ],
            "chunks": chunks,
            "attrs": self.attrs,
        }
        return table, sorted({chunk_path(c["id"]) for c in chunks})

    def _views(self, start: int, end: int) -> list[memoryview]:
        """The bytes of rows ``[start, end)`` of every field (views; a copy only for non-contiguous arrays)."""
        return [_row_bytes(self.arrays[f.name], start, end) for f in self.fields]


class _CountingWriter(io.RawIOBase):
    def __init__(self, dest: Any) -> None:
        self.dest = dest
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        n = memoryview(b).nbytes
        self.dest.write(b)
        self.count += n
        return n


def _stored_chunks(storage: Storage) -> dict[str, int]:
    """Name -> size of every stored chunk, in one listing (not one request per chunk)."""
    path = storage.path(CHUNK_DIR)
    try:
        storage.fs.invalidate_cache(path)
        entries = storage.fs.ls(path, detail=True)
    except FileNotFoundError:
        return {}
    except Exception as exc:
        detail = f"{type(exc).__name__}: {redact(str(exc))[:500]}"
        raise StorageError(f"listing {storage.url_of(CHUNK_DIR)} failed: {detail}") from exc
    out: dict[str, int] = {}
    for e in entries:
        name = str(e["name"]).rstrip("/").rsplit("/", 1)[-1]
        if e.get("type") == "file" and name.endswith(".zst") and not name.startswith("."):
            out[name] = int(e["size"])
    return out


def _as_rows(name: str, array: Any, rows: int) -> np.ndarray:
    if not isinstance(array, np.ndarray):
        raise TypeError(f"field {name!r} must be a numpy array, not {type(array).__name__}")
    if array.ndim == 0 or array.dtype.hasobject:
        raise TypeError(f"field {name!r} must be an array of rows of plain data, not {array.dtype}{array.shape}")
    if not 0 <= rows <= array.shape[0]:
        raise ValueError(f"field {name!r} has {array.shape[0]} rows; cannot save {rows}")
    return array


def _row_bytes(array: np.ndarray, start: int, end: int) -> memoryview:
    part = array[start:end]
    if not part.flags.c_contiguous:
        part = np.ascontiguousarray(part)  # one chunk's worth, never the whole array
    return part.reshape(-1).view(np.uint8).data


# -- reading --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkTable:
    """A parsed, validated chunk table."""

    kind: str
    rows: int
    chunk_rows: int
    fields: list[_Field]
    chunks: list[dict[str, Any]]
    attrs: dict[str, Any]

    @classmethod
    def parse(cls, table: Any, where: str) -> ChunkTable:
        try:
            if table.get("format") != TABLE_FORMAT:
                raise ValueError(f"format {table.get('format')!r} is not {TABLE_FORMAT!r}")
            fields = [
                _Field(
                    str(f["name"]),
                    np.lib.format.descr_to_dtype(f["dtype"]),
                    tuple(int(d) for d in f["shape"]),
                )
                for f in table["fields"]
            ]
            if any(f.dtype.hasobject for f in fields):
                raise ValueError("object dtypes are never decoded")
            chunks = [dict(c) for c in table["chunks"]]
            rows = int(table["rows"])
            if sum(int(c["rows"]) for c in chunks) != rows:
                raise ValueError(f"chunks hold {sum(int(c['rows']) for c in chunks)} rows, table says {rows}")
            for c in chunks:
                if int(c["raw_size"]) != int(c["rows"]) * sum(f.row_bytes for f in fields):
                    raise ValueError(f"chunk {c['id']} declares {c['raw_size']} bytes for {c['rows']} rows")
                if not (isinstance(c["id"], str) and _CHUNK_ID.fullmatch(c["id"])):
                    raise ValueError(f"bad chunk id {c['id']!r}")
            return cls(str(table["kind"]), rows, int(table["chunk_rows"]), fields, chunks, dict(table["attrs"]))
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise CorruptSnapshotError(f"{where}: not a valid chunk table: {exc}") from exc


def read_chunks(
    storage: Storage,
    table: ChunkTable,
    *,
    where: str,
    into: Mapping[str, np.ndarray] | None = None,
    verify: bool = False,
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Stream the chunks of ``table``, one at a time: yield ``(first row, {field: rows})``.

    With ``into`` (field -> array with at least ``table.rows`` rows), each chunk is decompressed straight into
    those arrays and the yielded rows are views of them; otherwise each chunk gets fresh arrays. Either way at
    most one chunk's compressed bytes (read in 4 MiB ranges) and zstd's window are held besides.

    Every chunk's size and zstd content checksum are checked. With ``verify``, its sha256 is also checked
    against its id (catching a chunk stored under the wrong name, at about twice the CPU of decompressing):
    in a second thread while the next chunk decompresses when ``into`` is given (a mismatch is raised at the
    latest when the stream ends), before the chunk is yielded otherwise.
    """
    start = 0
    with ThreadPoolExecutor(1, thread_name_prefix="bucketsnap-sha256") as pool:
        pending: Future[None] | None = None
        for chunk in table.chunks:
            n = int(chunk["rows"])
            if into is not None:
                out = {f.name: into[f.name][start : start + n] for f in table.fields}
            else:
                out = {f.name: np.empty((n, *f.row_shape), dtype=f.dtype) for f in table.fields}
            chunk_where = f"{where} chunk {storage.url_of(chunk_path(chunk['id']))}"
            views = _decompress_chunk(storage, chunk, [out[f.name] for f in table.fields], chunk_where)
            if verify and into is None:
                _check_digest(views, chunk["id"], chunk_where)
            elif verify:
                if pending is not None:
                    pending.result()
                pending = pool.submit(_check_digest, views, chunk["id"], chunk_where)
            yield start, out
            start += n
        if pending is not None:
            pending.result()


def _decompress_chunk(
    storage: Storage, chunk: dict[str, Any], arrays: list[np.ndarray], where: str
) -> list[memoryview]:
    """Decompress one chunk object into ``arrays`` (field after field); return their byte views."""
    raw = _RangeStream(storage, chunk_path(chunk["id"]), int(chunk["stored_size"]), where)
    views = [a.reshape(-1).view(np.uint8).data for a in arrays]
    try:
        with zstandard.ZstdDecompressor().stream_reader(raw, read_size=_READ_SIZE, closefd=False) as z:  # type: ignore[arg-type]
            for view in views:
                got = 0
                while got < view.nbytes:
                    n = z.readinto(view[got:])
                    if not n:
                        raise CorruptSnapshotError(f"{where}: decompresses to fewer bytes than its rows need")
                    got += n
            if z.read(1):
                raise CorruptSnapshotError(f"{where}: decompresses to more bytes than its rows need")
    except zstandard.ZstdError as exc:
        raise CorruptSnapshotError(f"{where}: corrupt zstd data: {exc}") from exc
    return views


def _digest(views: list[memoryview]) -> str:
    digest = hashlib.sha256()
    for view in views:
        digest.update(view)
    return digest.hexdigest()


def _check_digest(views: list[memoryview], chunk_id: str, where: str) -> None:
    if _digest(views) != chunk_id:  # hashlib releases the GIL: overlaps with the next chunk's decompression
        raise CorruptSnapshotError(f"{where}: content does not match its sha256 id")


class _RangeStream(io.RawIOBase):
    """An object read forward in ranged requests, so a restore never holds a whole compressed chunk."""

    def __init__(self, storage: Storage, rel: str, size: int, where: str) -> None:
        self._storage = storage
        self._rel = rel
        self._pos = 0
        self._size = size
        self._where = where

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        if self._pos >= self._size or not len(view):
            return 0
        end = min(self._size, self._pos + len(view), self._pos + _READ_SIZE)
        try:
            data = self._storage.read(self._rel, self._pos, end)
        except FileNotFoundError as exc:
            raise SnapshotNotFoundError(
                f"{self._where} is missing: it was deleted by hand or by a concurrent delete; load another itr"
            ) from exc
        if len(data) != end - self._pos:
            raise CorruptSnapshotError(f"{self._where}: truncated at byte {self._pos + len(data)} of {self._size}")
        view[: len(data)] = data
        self._pos = end
        return len(data)
