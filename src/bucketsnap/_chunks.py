"""Chunked arrays: rows of equal-length arrays stored as content-addressed zstd objects shared by snapshots.

A replay buffer is mostly a few big arrays whose rows are transitions. Saving it as one member would rewrite
gigabytes for every thousand new transitions; instead its rows are cut into chunks of a fixed number of rows,
and each chunk is stored once, as its own object::

    chunks/<hash of the raw bytes>-<CRC-32 of the object>-<save token>.zst
        one zstd frame (content size and checksum included) of the chunk's rows of every field, field after
        field; the name says what it holds (its BLAKE3 hash, or sha256 in tables of format 1), checks every
        stored byte (CRC-32) and which save wrote it
    chunks/<hash of what it decompresses to>-<CRC-32 of the object>-<save token>.shift.zst
        the same rows, where those of a field that repeat the next row of an earlier one (``shifted``: SB3's
        ``next_observations``, rows of 4 KiB or more) are stored once, as records (see
        :mod:`bucketsnap._row_shifts`); tables holding such chunks are of format 3

The snapshot's member for the buffer holds only the chunk table (hash function, ids, object names, row counts,
sizes) and the buffer's counters; the snapshot's ``refs`` list the chunk objects, so gc and delete keep a chunk
while any committed snapshot refers to it. A save finds every chunk's id, except those its caller vouches for
(``known``: a buffer whose ring position says which rows were written since its last save, see
:mod:`bucketsnap._buffer_changes`): where the caller has, from an earlier save of the same arrays, the XXH3-128
of a chunk's rows with the id of those same bytes (``previous``) and the rows still have that XXH3-128 (about
17 GB/s per core here), it takes that id; otherwise it hashes the rows (BLAKE3, about 4 GB/s per core), from a
private copy that also gives their XXH3-128; on one thread per core. It then compresses and writes, on the
same threads, only the chunks that no snapshot of the generation it started from holds: the chunks that changed
since the last save, usually one or two per thousand transitions. A chunk written is copied a block at a time
and hashed again from the copy it is compressed from, so its id names exactly what it holds even if the arrays
changed after the first hash (another thread or process writing them); it is then stored under that id. A
run's first save, with no chunk to reuse, skips the first hash: each chunk is hashed once, as it is compressed.

A chunk is reused only if a committed snapshot refers to it, never on the strength of a listing: an
unreferenced chunk (an orphan of a killed save, or one that retention dropped) may be condemned and deleted by
gc at any moment, and gc's deletions are ordered only against commits (see :mod:`bucketsnap._maintenance`). A
chunk that is written is named with the save's token, so two saves never write, or gc never deletes, one
another's objects. Runs written before names carried a CRC (``chunks/<sha256>.zst``) and tables of format 1
(sha256 ids) stay readable; their chunks are not reused by saves that hash with BLAKE3 (the ids differ), so the
first save after the upgrade writes every chunk once more.

Trade-offs: a chunk is addressed by its content, so nothing needs to track which rows changed (SB3's buffers
cannot tell), at the price of reading the whole buffer once per save, unless the caller vouches for the
unchanged chunks. Taking an id from a matching XXH3-128 trusts a 128-bit non-cryptographic hash to tell changed
rows from unchanged ones (rows that changed yet keep their XXH3-128 by chance, about once in 2**128, would be
saved as they were); the id itself, which other snapshots share the chunk by, stays BLAKE3.

A restore decompresses chunks on one thread per core, with ranged reads, straight into the destination arrays,
and checks each chunk's size, zstd checksum and (with ``verify``) hash.
"""

from __future__ import annotations

import collections
import hashlib
import io
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import blake3
import numpy as np
import xxhash
import zstandard

from bucketsnap import _stored_chunks
from bucketsnap._chunk_names import CHUNK_DIR, chunk_object, is_shifted, named_checksum, object_crc
from bucketsnap._chunk_names import CHUNK_OBJECT as _CHUNK_OBJECT
from bucketsnap._pools import Pool
from bucketsnap._prefault import prefault
from bucketsnap._row_shifts import MIN_ROW_BYTES, RegionWriter, Scatter, Shift, decode, header
from bucketsnap._storage import Storage
from bucketsnap._zipformat import READ_CHUNK, RangeReader, crc32
from bucketsnap.errors import CorruptSnapshotError, SnapshotNotFoundError

if TYPE_CHECKING:
    from bucketsnap._saving import StoredObjects

__all__ = [
    "CHUNK_DIR",
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_LEVEL",
    "TABLE_FORMAT",
    "ChunkedArrays",
    "chunk_object",
    "named_checksum",
    "read_chunks",
]

#: Threads hashing, compressing and writing a buffer's chunks on save, and decompressing them on restore: one
#: per core, up to 8.
HASH_THREADS = max(1, min(8, os.cpu_count() or 1))
TABLE_FORMAT = "bucketsnap.chunked/2"
#: The format of a table with ``.shift.zst`` chunks (rows repeating another field's next row stored once): a
#: reader of format 2 would not know them, so it is told to upgrade instead.
SHIFTED_TABLE_FORMAT = "bucketsnap.chunked/3"
#: Tables of format 1 name chunks by sha256; format 2 says which hash in its ``hash`` field.
_TABLE_FORMATS = ("bucketsnap.chunked/1", TABLE_FORMAT, SHIFTED_TABLE_FORMAT)
#: The hash a save names new chunks by.
HASH = "blake3"
_HASHES: dict[str, Callable[[], Any]] = {"blake3": blake3.blake3, "sha256": hashlib.sha256}
Bounds = tuple[int, int]
#: Raw bytes per chunk that the default number of rows per chunk aims at: big enough for few requests and good
#: compression, small enough that a restore's extra memory stays modest and a save after a few thousand
#: transitions rewrites little.
DEFAULT_CHUNK_BYTES = 32 * 2**20
_CHUNK_ID = re.compile(r"[0-9a-f]{64}")
#: Bytes of a chunk copied at a time before they are hashed and compressed (see ``ChunkedArrays._compress``).
_COPY_BLOCK = 2**20
#: zstd level of a buffer's chunks, compressed with a window of at least :data:`MIN_WINDOW_LOG`. Measured on
#: 2026-12-01 against level 3: stacked Atari frames compress 1.2-1.6x faster and to 489:1 against 372:1; dense
#: float32 observations (random walks of 8 to 120 dimensions, 10k transitions) to the same size within 10 %, at
#: the same CPU; noisy camera frames to 1.2x more bytes with 4x less CPU. Level 1's own 512 KiB window stored
#: small dense buffers 1.7-1.85x larger than level 3, whose 2 MiB window found ``next_observations`` repeating
#: ``observations`` one field further on in the chunk: hence the wider window.
DEFAULT_LEVEL = 1
#: The smallest zstd window a chunk is compressed with (2 MiB, level 3's): what a restore's decoder holds per
#: thread, besides one ranged read.
MIN_WINDOW_LOG = 21


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
    :class:`~bucketsnap._store.ExternalValue`); the member holds the chunk table and ``attrs``.

    Args:
        arrays: field name -> array; rows are along the first axis; only the first ``rows`` rows are saved.
        rows: how many rows to save.
        kind: what the arrays are (e.g. ``"sb3.ReplayBuffer"``), checked on restore.
        attrs: JSON-like counters saved with the table (position, full flag...).
        chunk_rows: rows per chunk; by default as many as fit in :data:`DEFAULT_CHUNK_BYTES`.
        level: zstd compression level of the chunks (:data:`DEFAULT_LEVEL`).
        hash_threads: threads hashing, compressing and writing chunks (by default one per core, up to 8).
        known: chunk bounds ``(start, end)`` -> BLAKE3 id of chunks whose rows the caller vouches are unchanged
            since they were hashed; they are not hashed again.
        spot_check: bounds of ``known`` chunks to hash anyway: if one differs from its known id, the caller's
            account was wrong, and every chunk is hashed (with a warning).
        on_hashed: called, once every chunk's id is known, with every chunk's bounds -> id (the caller's next
            ``known``) and bounds -> ``(XXH3-128 of its rows, id)`` for the chunks whose rows were read (the
            caller's next ``previous``).
        previous: chunk bounds -> ``(XXH3-128 of the chunk's rows, its id)`` from an earlier save of the same
            arrays, both of the same bytes: a chunk whose rows still have that XXH3-128 takes that id without
            being hashed again (XXH3-128 reads the rows about 5x faster than BLAKE3 here).
        shifted: field -> an earlier field of the same dtype and row shape whose next row its rows usually
            repeat (SB3's ``next_observations`` -> ``observations``): where rows are 4 KiB or more, such rows
            are stored once, as records (see :mod:`bucketsnap._row_shifts`). A restore rebuilds the rows
            exactly; such a chunk's id is the hash of what its object decompresses to.
    """

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray],
        rows: int,
        *,
        kind: str,
        attrs: Mapping[str, Any] | None = None,
        chunk_rows: int | None = None,
        level: int = DEFAULT_LEVEL,
        hash_threads: int | None = None,
        known: Mapping[Bounds, str] | None = None,
        spot_check: Sequence[Bounds] = (),
        on_hashed: Callable[[dict[Bounds, str], dict[Bounds, tuple[str, str]]], None] | None = None,
        shifted: Mapping[str, str] | None = None,
        previous: Mapping[Bounds, tuple[str, str]] | None = None,
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
        if hash_threads is not None and hash_threads < 1:
            raise ValueError(f"hash_threads must be at least 1, not {hash_threads}")
        self.hash_threads = hash_threads or HASH_THREADS
        self.known = dict(known or {})
        self.spot_check = [b for b in spot_check if b in self.known]
        self.on_hashed = on_hashed
        self.shifted = _check_shifted(self.fields, dict(shifted or {}))
        self.previous = dict(previous or {})
        #: How many chunks the last :meth:`write_objects` read to find their id (for tests and benchmarks).
        self.hashed = 0
        #: How many of those it hashed with BLAKE3: the others' XXH3-128 matched ``previous``.
        self.rehashed = 0
        #: This save's chunk bounds -> (XXH3-128 of rows it read, the id of those rows), and the bounds of those
        #: whose id came from ``previous``.
        self._contents: dict[Bounds, tuple[str, str]] = {}
        self._reused: set[Bounds] = set()

    def __repr__(self) -> str:
        return f"ChunkedArrays(kind={self.kind!r}, rows={self.rows}, chunk_rows={self.chunk_rows})"

    def bounds(self) -> list[Bounds]:
        """The ``(start, end)`` rows of every chunk, in order."""
        return [(a, min(a + self.chunk_rows, self.rows)) for a in range(0, self.rows, self.chunk_rows)]

    def host_copy(self) -> ChunkedArrays:
        """A private copy of the saved rows, for a background save."""
        copies = {name: np.array(a[: self.rows], copy=True) for name, a in self.arrays.items()}
        return ChunkedArrays(
            copies,
            self.rows,
            kind=self.kind,
            attrs=self.attrs,
            chunk_rows=self.chunk_rows,
            level=self.level,
            hash_threads=self.hash_threads,
            known=self.known,
            spot_check=self.spot_check,
            on_hashed=self.on_hashed,
            shifted=self.shifted,
            previous=self.previous,
        )

    def write_objects(self, storage: Storage, objects: StoredObjects) -> tuple[dict[str, Any], list[str]]:
        """Write the chunks that no snapshot of ``objects.committed`` holds; return the chunk table and the
        chunk paths."""
        existing = _reusable_chunks(storage, objects.committed)
        bounds = self.bounds()
        claimed: set[str] = set()  # ids being written by this save
        lock = threading.Lock()

        self._contents, self._reused = {}, set()

        def store(i: int) -> tuple[str, tuple[str, int] | None]:
            chunk_id, compressed, shifted, content = self._compress(bounds[i])
            key = _key(chunk_id, shifted)
            self._contents[bounds[i]] = (content, key)
            with lock:
                if key in existing or key in claimed:  # another chunk of this content
                    return key, None
                claimed.add(key)
            return key, self._write_compressed(storage, objects.token, chunk_id, compressed, shifted)

        with Pool(self.hash_threads, thread_name_prefix="bucketsnap-chunks") as pool:
            # Nothing stored to reuse (a run's first save): every chunk is hashed once, as it is compressed.
            ids: list[str | None] = list(self._ids(pool, bounds, storage)) if existing else [None] * len(bounds)
            if not existing:
                self.hashed = self.rehashed = len(bounds)
            # Stored until every chunk's id names a stored object: a chunk whose rows changed after they were
            # hashed (another thread or process writing the arrays) is stored under the id of what was
            # compressed, and a chunk that shared its first id with it is then stored on its own.
            while missing := [i for i, chunk_id in enumerate(ids) if chunk_id is None or chunk_id not in existing]:
                firsts = {ids[i]: i for i in reversed(missing) if ids[i] is not None}  # one per content
                todo = sorted({i for i in missing if ids[i] is None} | set(firsts.values()))
                for i, (chunk_id, stored) in zip(todo, pool.map(store, todo), strict=True):
                    ids[i] = chunk_id
                    if stored is not None:
                        existing[chunk_id] = stored
        final = [str(chunk_id) for chunk_id in ids]
        if self.on_hashed is not None:
            # A digest is kept only with the id of the same bytes: a chunk stored under another id than the one
            # first found (its rows changed meanwhile) keeps the digest of what was stored, or none.
            contents = {}
            for b, chunk_id in zip(bounds, final, strict=True):
                pair = self._contents.get(b, self.previous.get(b))
                if pair is not None and pair[1] == chunk_id:
                    contents[b] = pair
            self.on_hashed(dict(zip(bounds, final, strict=True)), contents)
        raw_row = sum(f.row_bytes for f in self.fields)
        chunks: list[dict[str, Any]] = [
            {
                "id": chunk_id.split(".")[0],
                "path": existing[chunk_id][0],
                "rows": end - start,
                "raw_size": (end - start) * raw_row,
                "stored_size": existing[chunk_id][1],
            }
            for (start, end), chunk_id in zip(bounds, final, strict=True)
        ]
        table = {
            "format": SHIFTED_TABLE_FORMAT if any(is_shifted(c["path"]) for c in chunks) else TABLE_FORMAT,
            "hash": HASH,
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
        return table, sorted({c["path"] for c in chunks})

    def _ids(self, pool: Pool, bounds: list[Bounds], storage: Storage) -> list[str]:
        """Every chunk's id: hashed on the pool's threads, or as ``known`` says once the spot checks agree."""
        known = self.known
        digests = {
            b: pool.submit(self._digest_rows if b in self.spot_check else self._identify, *b)
            for b in bounds
            if b not in known or b in self.spot_check
        }
        wrong = [b for b in self.spot_check if b in digests and digests[b].result() != known[b]]
        if wrong:
            warnings.warn(
                f"rows {wrong[0][0]}-{wrong[0][1] - 1} of the {self.kind} buffer saved to {storage.url_of('')} "
                "changed though the buffer's ring position says they were not written since its last save (a "
                "reset and refill, a whole turn of the ring, or a direct write into its arrays): every chunk is "
                "hashed for this save; use buffer_state(buffer, changes='hash') if its arrays are written directly",
                RuntimeWarning,
                stacklevel=2,
            )
            known = {}
            digests.update({b: pool.submit(self._identify, *b) for b in bounds if b not in digests})
        ids = [digests[b].result() if b in digests else known[b] for b in bounds]
        self.hashed = len(digests)
        self.rehashed = self.hashed - len(self._reused)
        return ids

    def _identify(self, start: int, end: int) -> str:
        """The key of rows ``[start, end)``: the earlier save's where their XXH3-128 is still the one it recorded
        (``previous``), else hashed."""
        earlier = self.previous.get((start, end))
        if earlier is not None:
            content = xxhash.xxh3_128()
            for view in self._views(start, end):
                content.update(view)
            if content.hexdigest() == earlier[0]:
                self._contents[(start, end)] = earlier
                self._reused.add((start, end))
                return earlier[1]
        return self._digest_rows(start, end)

    def _digest_rows(self, start: int, end: int) -> str:
        """The key of rows ``[start, end)`` as they are now (see :func:`_key`): the hash of what their chunk
        object decompresses to. The rows' XXH3-128, taken from the same private copy, is kept with it."""
        digest, content = _HASHES[HASH](), xxhash.xxh3_128()
        self._encode(start, end, digest.update, private=True, on_rows=content.update)
        key = _key(str(digest.hexdigest()), bool(self._shifts(end - start)))
        self._contents[(start, end)] = (content.hexdigest(), key)
        return key

    def _compress(self, bounds: Bounds) -> tuple[str, memoryview, bool, str]:
        """Rows ``bounds`` compressed (one chunk's worth, in memory, so that its name can carry its id and CRC-32),
        their id, and whether they are stored as shifted rows (see :mod:`bucketsnap._row_shifts`).

        The rows go through a private copy, a block at a time (a shifted field's source field whole), and the id
        is the hash of exactly the bytes compressed: whatever else writes the arrays meanwhile, a stored chunk
        always holds what its id names. Last, the XXH3-128 of the rows as compressed (the private copy's).
        """
        start, end = bounds
        raw_size = (end - start) * sum(f.row_bytes for f in self.fields)
        shifted = bool(self._shifts(end - start))
        cctx = zstandard.ZstdCompressor(compression_params=_parameters(self.level, raw_size))
        digest, content = _HASHES[HASH](), xxhash.xxh3_128()
        data = io.BytesIO()
        # A shifted chunk's decompressed size is known only once its rows are compared: it is left undeclared.
        with cctx.stream_writer(data, size=-1 if shifted else raw_size, closefd=False) as zw:

            def sink(piece: Any) -> None:
                digest.update(piece)
                zw.write(piece)

            self._encode(start, end, sink, private=True, on_rows=content.update)
        return str(digest.hexdigest()), data.getbuffer(), shifted, content.hexdigest()

    def _encode(
        self,
        start: int,
        end: int,
        sink: Callable[[Any], object],
        *,
        private: bool,
        on_rows: Callable[[Any], object] | None = None,
    ) -> None:
        """Hand ``sink`` the bytes that the chunk object of rows ``[start, end)`` decompresses to, in order: the
        rows field after field, or, where fields are shifted, the header, the rows and the records.

        With ``private``, every row goes through a private copy first (a block at a time; a shifted field's
        source field whole), and the records are decided on those copies: what ``sink`` gets is consistent
        whatever writes the arrays meanwhile. Without, the arrays are read as they are (an id to look up).
        ``on_rows``, if given, is handed the rows themselves, field after field, as ``sink``'s bytes are made from
        them.
        """
        rows = end - start
        shifts = self._shifts(rows)
        views = self._views(start, end)
        names = set(self.shifted.values()) if shifts else set()
        # copied a block of whole rows at a time (at least one row, at most the chunk)
        size = min(sum(v.nbytes for v in views), max(_COPY_BLOCK, *(f.row_bytes for f in self.fields)))
        block = memoryview(bytearray(size if private else 0))
        if private:
            sources = _private_sources(self.fields, names, rows)
        else:
            sources = {f.name: np.frombuffer(views[i], np.uint8) for i, f in enumerate(self.fields) if f.name in names}
        if shifts:
            sink(header(list(shifts.values())))
        for i, view in enumerate(views):
            field, row_bytes = self.fields[i], max(1, self.fields[i].row_bytes)
            region = RegionWriter(sources[self.shifted[field.name]], row_bytes, rows, sink) if i in shifts else None
            step = max(1, size // row_bytes) * row_bytes
            for offset in range(0, view.nbytes, step):
                n = min(step, view.nbytes - offset)
                if private:
                    part = sources[field.name].data[offset : offset + n] if field.name in sources else block[:n]
                    _copy(part, view[offset : offset + n])
                else:
                    part = view[offset : offset + n]
                if on_rows is not None:
                    on_rows(part)
                if region is None:
                    sink(part)
                else:
                    region.add(part)
            if region is not None:
                region.close()

    def _shifts(self, rows: int) -> dict[int, Shift]:
        """Field index -> its region in a chunk of ``rows`` rows, for the fields stored as shifted rows."""
        if rows < 2:
            return {}
        index = {f.name: i for i, f in enumerate(self.fields)}
        offsets = np.concatenate([[0], np.cumsum([rows * f.row_bytes for f in self.fields])]).tolist()
        shifts = {}
        for target, source in self.shifted.items():
            i = index[target]
            if self.fields[i].row_bytes >= MIN_ROW_BYTES:  # smaller rows: compared one by one, dearer than zstd
                shifts[i] = Shift(offsets[index[source]], offsets[i], self.fields[i].row_bytes, rows)
        return dict(sorted(shifts.items()))

    def _write_compressed(
        self, storage: Storage, token: str, chunk_id: str, compressed: memoryview, shifted: bool = False
    ) -> tuple[str, int]:
        """Write a compressed chunk as a new object; return its path and stored size."""
        suffix = ".shift.zst" if shifted else ".zst"
        rel = f"{CHUNK_DIR}/{chunk_id}-{crc32(compressed):08x}-{token}{suffix}"
        with storage.write(rel) as f:
            f.write(compressed)
        _stored_chunks.remember(storage, rel, len(compressed))
        return rel, len(compressed)

    def _views(self, start: int, end: int) -> list[memoryview]:
        """The bytes of rows ``[start, end)`` of every field (views; a copy only for non-contiguous arrays)."""
        return [_row_bytes(self.arrays[f.name], start, end) for f in self.fields]


def _parameters(level: int, raw_size: int) -> zstandard.ZstdCompressionParameters:
    """zstd's parameters for ``level``, with a window of at least :data:`MIN_WINDOW_LOG` (a chunk holds its fields
    one after the other, and a replay buffer's ``next_observations`` repeat its ``observations`` a field apart)."""
    window_log = zstandard.ZstdCompressionParameters.from_level(level, source_size=raw_size).window_log
    return zstandard.ZstdCompressionParameters.from_level(
        level,
        source_size=raw_size,
        window_log=max(window_log, min(MIN_WINDOW_LOG, max(10, raw_size.bit_length()))),
        write_checksum=1,
        write_content_size=1,
    )


def _copy(to: memoryview, data: memoryview) -> None:
    """``to[:] = data``, with the GIL released (numpy's copy; a memoryview's holds it): the other threads of a
    save hash and compress meanwhile."""
    np.copyto(np.frombuffer(to, np.uint8), np.frombuffer(data, np.uint8))


def _check_shifted(fields: list[_Field], shifted: dict[str, str]) -> dict[str, str]:
    """``shifted`` checked against ``fields``: each target after its source, both of one dtype and row shape."""
    index = {f.name: i for i, f in enumerate(fields)}
    for target, source in shifted.items():
        if target not in index or source not in index:
            raise ValueError(f"shifted names a field the arrays do not have: {target!r} -> {source!r}")
        t, s = fields[index[target]], fields[index[source]]
        if index[source] >= index[target] or source in shifted or (t.dtype, t.row_shape) != (s.dtype, s.row_shape):
            raise ValueError(
                f"field {target!r} cannot repeat {source!r}'s rows: the source must be an earlier field, not itself "
                "shifted, of the same dtype and row shape"
            )
    return shifted


#: Each thread's private copy of the source fields of the chunk it compresses, kept for its next chunk.
_PRIVATE = threading.local()


def _private_sources(fields: list[_Field], names: set[str], rows: int) -> dict[str, np.ndarray]:
    """Field name -> this thread's private buffer for ``rows`` rows of that field, for the fields ``names``."""
    need = sum(rows * f.row_bytes for f in fields if f.name in names)
    buffer = getattr(_PRIVATE, "buffer", None)
    if buffer is None or buffer.nbytes < need:
        buffer = _PRIVATE.buffer = np.empty(need, np.uint8)
    out, at = {}, 0
    for f in fields:
        if f.name in names:
            out[f.name] = buffer[at : at + rows * f.row_bytes]
            at += rows * f.row_bytes
    return out


def _key(chunk_id: str, shifted: bool) -> str:
    """What a save looks a chunk up by: its id, and ``.shift`` for a shifted-rows object. Both ids hash what the
    object decompresses to, but a plain object whose rows happen to read as a shifted body would rebuild other
    rows: a chunk is reused only as the encoding it was written in."""
    return f"{chunk_id}.shift" if shifted else chunk_id


def _reusable_chunks(storage: Storage, committed: Iterable[str]) -> dict[str, tuple[str, int]]:
    """Chunk key (see :func:`_key`) -> (object, size) of the stored chunks that committed snapshots refer to (a
    listing of ``chunks/`` only where this process does not know one of them: :mod:`bucketsnap._stored_chunks`)."""
    wanted: dict[str, str] = {}
    for rel in committed:
        match = _CHUNK_OBJECT.fullmatch(rel)
        if match:
            wanted[rel.rsplit("/", 1)[-1]] = _key(match.group(1), bool(match.group(3)))
    return _stored_chunks.lookup(storage, wanted) if wanted else {}


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
    #: The hash function of the chunk ids: ``"blake3"``, or ``"sha256"`` in tables of format 1.
    hash: str = "sha256"

    @classmethod
    def parse(cls, table: Any, where: str) -> ChunkTable:
        try:
            if table.get("format") not in _TABLE_FORMATS:
                raise ValueError(
                    f"format {table.get('format')!r} is not one of {', '.join(_TABLE_FORMATS)}: it was written "
                    "by a newer bucketsnap; upgrade bucketsnap to read it"
                )
            hash_name = "sha256" if table["format"] == _TABLE_FORMATS[0] else table.get("hash")
            if hash_name not in _HASHES:
                raise ValueError(f"unknown chunk hash {hash_name!r}")
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
                match = _CHUNK_OBJECT.fullmatch(chunk_object(c)) if isinstance(c.get("path", ""), str) else None
                if match is None or match.group(1) != c["id"]:
                    raise ValueError(f"chunk {c['id']} names object {c.get('path')!r}, not one of its own")
            return cls(
                str(table["kind"]), rows, int(table["chunk_rows"]), fields, chunks, dict(table["attrs"]), hash_name
            )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise CorruptSnapshotError(f"{where}: not a valid chunk table: {exc}") from exc


def read_chunks(
    storage: Storage,
    table: ChunkTable,
    *,
    where: str,
    into: Mapping[str, np.ndarray] | None = None,
    verify: bool = False,
    threads: int | None = None,
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Stream the chunks of ``table`` in order: yield ``(first row, {field: rows})``.

    Chunks are read and decompressed on ``threads`` threads (by default one per core, up to 8), and yielded in
    order. With ``into`` (field -> array with at least ``table.rows`` rows), each chunk is decompressed
    straight into those arrays and the yielded rows are views of them, two chunks per thread in flight;
    otherwise each chunk gets fresh arrays, one chunk per thread in flight. Besides those, a thread holds at
    most 4 MiB of compressed bytes (one ranged read) and zstd's window.

    Every chunk's size and zstd content checksum are checked. With ``verify``, its hash is also checked
    against its id (catching a chunk stored under the wrong name) and every stored byte against the CRC-32 its
    name records, on the same thread, before the chunk is yielded.
    """
    starts = np.concatenate([[0], np.cumsum([int(c["rows"]) for c in table.chunks], dtype=np.int64)]).tolist()

    def load(i: int) -> dict[str, np.ndarray]:
        chunk, start = table.chunks[i], starts[i]
        n = int(chunk["rows"])
        if into is not None:
            out = {f.name: into[f.name][start : start + n] for f in table.fields}
        else:
            out = {f.name: np.empty((n, *f.row_shape), dtype=f.dtype) for f in table.fields}
        chunk_where = f"{where} chunk {storage.url_of(chunk_object(chunk))}"
        digest = _HASHES[table.hash]() if verify else None
        _decompress_chunk(storage, chunk, [out[f.name] for f in table.fields], chunk_where, digest)
        if digest is not None and digest.hexdigest() != chunk["id"]:
            raise CorruptSnapshotError(f"{chunk_where}: content does not match its {table.hash} id")
        return out

    workers = max(1, threads or HASH_THREADS)
    # Chunks decoded into ``into`` cost no memory while they wait to be yielded: keep twice as many in flight as
    # threads, so that a thread done with a later chunk starts the next one while an earlier one finishes.
    window = 2 * workers if into is not None else workers
    with Pool(workers, thread_name_prefix="bucketsnap-chunks") as pool:
        pending: collections.deque[Future[dict[str, np.ndarray]]] = collections.deque()
        try:
            for i in range(len(table.chunks)):
                if len(pending) >= window:
                    yield starts[i - len(pending)], pending.popleft().result()
                pending.append(pool.submit(load, i))
            while pending:
                yield starts[len(table.chunks) - len(pending)], pending.popleft().result()
        finally:
            for future in pending:  # a failure or an abandoned stream: start nothing more
                future.cancel()


def _decompress_chunk(
    storage: Storage, chunk: dict[str, Any], arrays: list[np.ndarray], where: str, digest: Any = None
) -> None:
    """Decompress one chunk object into ``arrays`` (field after field).

    With ``digest`` (a hash object: a verifying read), it is fed every byte the object decompresses to, and
    every stored byte is also checked against the CRC-32 the object's name records.
    """
    rel = chunk_object(chunk)
    raw = _object_reader(storage, rel, int(chunk["stored_size"]), where)
    views = [a.reshape(-1).view(np.uint8).data for a in arrays]
    for a in arrays:
        prefault(a.reshape(-1).view(np.uint8).data)
    scatter = Scatter(views)
    try:
        with zstandard.ZstdDecompressor().stream_reader(raw, read_size=READ_CHUNK, closefd=False) as z:  # type: ignore[arg-type]
            if is_shifted(rel):
                decode(z, scatter, [a.nbytes // max(1, len(a)) for a in arrays], where, digest)  # type: ignore[arg-type]
            else:
                scatter.fill(z, 0, scatter.size, where, digest)  # type: ignore[arg-type]
            if z.read(1):
                raise CorruptSnapshotError(f"{where}: decompresses to more bytes than its rows need")
    except zstandard.ZstdError as exc:
        raise CorruptSnapshotError(f"{where}: corrupt zstd data: {exc}") from exc
    if digest is not None:
        _check_crc(raw, object_crc(rel), where)


def _object_reader(storage: Storage, rel: str, size: int, where: str) -> RangeReader:
    """Object ``rel`` read forward in ranged requests, so a restore never holds a whole compressed chunk."""

    def read_range(start: int, end: int) -> bytes:
        try:
            return storage.read(rel, start, end)
        except FileNotFoundError as exc:
            raise SnapshotNotFoundError(
                f"{where} is missing: it was deleted by hand or by a concurrent delete; load another itr"
            ) from exc

    return RangeReader(read_range, 0, size, where=where)


def _check_crc(reader: RangeReader, expected: int | None, where: str) -> None:
    """Read what is left, then raise CorruptSnapshotError unless the bytes read match ``expected``."""
    crc = reader.finish()
    if expected is not None and crc != expected:
        raise CorruptSnapshotError(
            f"{where}: its bytes do not match the CRC-32 in its name ({crc:08x}, not {expected:08x})"
        )
