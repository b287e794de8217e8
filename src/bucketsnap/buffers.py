"""Replay buffers and rollout storages saved as chunked members: incremental saves, streamed restores.

Three kinds of buffer are understood:

* SB3's ``ReplayBuffer`` and ``DictReplayBuffer`` (:mod:`bucketsnap.integrations._sb3_buffers`, imported
  here only once SB3 has been): every array is saved in its physical ring layout with ``pos`` and ``full``,
  and restored in place into a buffer of the same shape, so a buffer that has wrapped around comes back exact.
* :class:`TransitionStorage`, a ring storage in the spirit of pytorchrl's ``Storage`` (``insert_transition``,
  ``insert_data_slice``, ``get_all_buffer_data``, ``reset``), saved the same way.
* Any other object with pytorchrl's ``get_all_buffer_data``, ``insert_data_slice`` and ``reset``: what
  ``get_all_buffer_data(data_to_cpu=True)`` returns is saved, and a restore calls ``reset()`` then
  ``insert_data_slice`` once per chunk, so it never needs the whole buffer twice in memory.

Each kind is a :class:`BufferKind` in a table, tried in turn: its stored name, ``matches``, the arrays and
counters it saves (``state``) and its in-place ``restore``. Another kind of buffer is one
:func:`register_buffer_kind` call; a framework's kinds live in its module under :mod:`bucketsnap.integrations`,
imported here once the framework has been.

Wrap the buffer with :func:`buffer_state` in the state you save, and bring it back with :func:`restore_buffer`::

    store.save(itr, {"policy": policy.state_dict(), "replay_buffer": buffer_state(buffer)})
    restore_buffer(store, buffer)

The buffer's rows are stored as content-addressed chunks shared by the run's snapshots
(:mod:`bucketsnap._chunks`): a save after a thousand new transitions uploads the few chunks that changed.
"""

from __future__ import annotations

import importlib
import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from bucketsnap import _chunks
from bucketsnap._buffer_changes import Ring, Tracker
from bucketsnap._chunks import DEFAULT_LEVEL, ChunkedArrays, ChunkTable, read_chunks
from bucketsnap._storage import Storage
from bucketsnap._store import SnapshotStore, as_store

__all__ = [
    "BufferKind",
    "BufferState",
    "Ring",
    "SavedBuffer",
    "TransitionStorage",
    "buffer_state",
    "register_buffer_kind",
    "restore_buffer",
]

Which = int | str


class TransitionStorage:
    """A ring buffer of transitions with pytorchrl's ``Storage`` data interface, held in CPU torch tensors.

    Tensors are allocated from the first sample (``init_tensors``); once ``size`` transitions are stored, new
    ones overwrite the oldest.

    Args:
        size: capacity, in transitions.

    Example:
        >>> s = TransitionStorage(3)
        >>> for i in range(4):
        ...     s.insert_transition({"obs": [i, i], "rew": float(i)})
        >>> s.pos, s.full, s.get_all_buffer_data()["rew"].tolist()
        (1, True, [1.0, 2.0, 3.0])
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"size must be at least 1, not {size}")
        self.size = size
        self.data: dict[str, torch.Tensor] = {}
        self.pos = 0
        self.full = False
        #: Transitions ever inserted, across resets: which rows changed since a save, exactly.
        self.rows_written = 0

    def __len__(self) -> int:
        return self.size if self.full else self.pos

    def __repr__(self) -> str:
        return f"TransitionStorage(size={self.size}, stored={len(self)}, fields={list(self.data)})"

    def init_tensors(self, sample: Mapping[str, Any]) -> None:
        """Allocate the storage tensors (``size`` rows each) from one transition."""
        self.data = {}
        for name, value in sample.items():
            t = torch.as_tensor(value)
            self.data[name] = torch.zeros((self.size, *t.shape), dtype=t.dtype)

    def insert_transition(self, sample: Mapping[str, Any]) -> None:
        """Store one transition (field -> value)."""
        if not self.data:
            self.init_tensors(sample)
        self._check_fields(sample)
        for name, value in sample.items():
            self.data[name][self.pos] = torch.as_tensor(value)
        self._advance(1)

    def insert_data_slice(self, new_data: Mapping[str, Any]) -> None:
        """Store a batch of transitions (field -> rows, all with the same number of rows), oldest first."""
        if not new_data:
            return
        batches = {name: torch.as_tensor(value) for name, value in new_data.items()}
        counts = {int(b.shape[0]) for b in batches.values()}
        if len(counts) != 1:
            raise ValueError(f"every field of a slice needs the same number of rows, got {sorted(counts)}")
        n = counts.pop()
        if not self.data:
            self.init_tensors({name: b[0] for name, b in batches.items()} if n else {})
        self._check_fields(batches)
        skip = max(0, n - self.size)  # only the newest `size` rows can be kept
        start = (self.pos + skip) % self.size
        left = n - skip
        done = 0
        while done < left:
            step = min(left - done, self.size - start)
            for name, b in batches.items():
                self.data[name][start : start + step] = b[skip + done : skip + done + step]
            start = (start + step) % self.size
            done += step
        self._advance(n)

    def get_all_buffer_data(self, data_to_cpu: bool = False) -> dict[str, torch.Tensor]:
        """The stored transitions, oldest first (a copy when the ring has wrapped; the data is always on CPU)."""
        if self.full and self.pos:
            return {name: torch.cat([t[self.pos :], t[: self.pos]]) for name, t in self.data.items()}
        return {name: t[: len(self)] for name, t in self.data.items()}

    def reset(self) -> None:
        """Forget every stored transition (the tensors are kept for reuse)."""
        self.pos = 0
        self.full = False

    def _advance(self, n: int) -> None:
        self.rows_written += n
        total = self.pos + n
        if total >= self.size:
            self.full = True
        self.pos = total % self.size

    def _check_fields(self, sample: Mapping[str, Any]) -> None:
        if set(sample) != set(self.data):
            raise KeyError(f"transition fields {sorted(sample)} differ from the storage's {sorted(self.data)}")


# -- buffer kinds -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BufferState:
    """What a :class:`BufferKind` saves of a buffer: rows ``[0, rows)`` of ``arrays``, and JSON-like ``attrs``."""

    arrays: Mapping[str, np.ndarray]
    rows: int
    attrs: dict[str, Any] = field(default_factory=dict)
    #: The ring position, for buffers whose rows are a ring written at ``pos`` (``changes="ring"``).
    ring: Ring | None = None
    #: Field -> an earlier field whose next row its rows usually repeat (SB3's ``next_observations`` ->
    #: ``observations``): such rows are stored once, and restored as they were.
    shifted: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SavedBuffer:
    """A buffer as a snapshot holds it, handed to :meth:`BufferKind.restore`: its chunk table and its chunks.

    Attributes:
        table: the parsed chunk table (``fields``, ``rows``, ``attrs``); its kind is the restoring kind's.
        where: the snapshot member, for messages.
    """

    table: ChunkTable
    where: str
    _storage: Storage
    _verify: bool

    @property
    def attrs(self) -> dict[str, Any]:
        """The ``attrs`` the buffer was saved with."""
        return self.table.attrs

    def check_fields(self, into: Mapping[str, np.ndarray]) -> None:
        """Raise ValueError unless ``into`` has the saved fields, each of the saved dtype and row shape, with
        room for the saved rows, C-contiguous."""
        _check_fields(self.table, into, self.where)

    def read_into(self, into: Mapping[str, np.ndarray]) -> None:
        """Decompress every chunk straight into ``into`` (field -> array of at least ``table.rows`` rows)."""
        for _ in read_chunks(self._storage, self.table, where=self.where, into=into, verify=self._verify):
            pass

    def chunks(self) -> Iterator[dict[str, np.ndarray]]:
        """The saved rows, one chunk at a time (field -> fresh array of that chunk's rows), oldest first."""
        for _, rows in read_chunks(self._storage, self.table, where=self.where, verify=self._verify):
            yield rows


class BufferKind(ABC):
    """One kind of buffer: how it is recognised, what of it is saved, and how it is restored in place.

    A new kind is a subclass registered with :func:`register_buffer_kind`; :func:`buffer_state` and
    :func:`restore_buffer` then handle its buffers. ``name`` is stored with the saved buffer and checked on
    restore, so keep it stable (``"sb3.ReplayBuffer"``, ``"bucketsnap.TransitionStorage"``...).
    """

    name: ClassVar[str]

    @abstractmethod
    def matches(self, buffer: Any) -> bool:
        """Whether ``buffer`` is of this kind (raise TypeError to refuse a buffer recognised but not supported)."""

    def restores_into(self, buffer: Any) -> bool:
        """Whether a buffer saved as this kind can be restored into ``buffer`` (by default: :meth:`matches`)."""
        return self.matches(buffer)

    @abstractmethod
    def state(self, buffer: Any) -> BufferState:
        """The arrays, row count and attrs to save of ``buffer``."""

    @abstractmethod
    def restore(self, buffer: Any, saved: SavedBuffer) -> None:
        """Bring ``buffer`` back, in place, to the state ``saved`` holds; raise ValueError if it cannot hold it."""


#: The kinds tried in turn, first match wins; the duck-typed pytorchrl kind comes after all of them.
_KINDS: list[BufferKind] = []
#: Framework module -> the bucketsnap module registering its kinds: imported once the framework has been (a
#: buffer cannot come from a framework that was never imported, so bucketsnap never imports one itself).
_FRAMEWORK_KINDS = {
    "stable_baselines3": "bucketsnap.integrations._sb3_buffers",
    "pytorchrl": "bucketsnap.integrations._pytorchrl_buffers",
}
_loaded: set[str] = set()
_lock = threading.Lock()


def register_buffer_kind(kind: BufferKind) -> None:
    """Let :func:`buffer_state` and :func:`restore_buffer` handle the buffers ``kind`` matches.

    Kinds are tried in the order they were registered, before the duck-typed pytorchrl kind.

    Raises:
        ValueError: a kind of that name is registered already.
    """
    with _lock:
        if any(k.name == kind.name for k in _KINDS):
            raise ValueError(f"a buffer kind named {kind.name!r} is registered already")
        _KINDS.append(kind)


def _kinds() -> list[BufferKind]:
    for framework, module in _FRAMEWORK_KINDS.items():
        if module not in _loaded and framework in sys.modules:
            with _lock:
                if module in _loaded:
                    continue
                _loaded.add(module)
            importlib.import_module(module)  # registers its kinds
    return [*_KINDS, _GENERIC]


class _TransitionStorageKind(BufferKind):
    name = "bucketsnap.TransitionStorage"

    def matches(self, buffer: Any) -> bool:
        return isinstance(buffer, TransitionStorage)

    def state(self, buffer: TransitionStorage) -> BufferState:
        arrays = {name: t.numpy() for name, t in buffer.data.items()}
        rows = buffer.size if buffer.full else buffer.pos
        if not arrays:
            raise ValueError("the TransitionStorage is empty and has no fields yet: insert a transition first")
        attrs = {"pos": buffer.pos, "full": buffer.full, "size": buffer.size}
        return BufferState(arrays, rows, attrs, Ring(buffer.size, buffer.pos, buffer.full, buffer.rows_written))

    def restore(self, buffer: TransitionStorage, saved: SavedBuffer) -> None:
        table = saved.table
        if table.attrs.get("size") != buffer.size:
            raise ValueError(
                f"{saved.where} was saved from a storage of size {table.attrs.get('size')}; this one has {buffer.size}"
            )
        if set(buffer.data) != {f.name for f in table.fields} or any(
            buffer.data[f.name].numpy().dtype != f.dtype or tuple(buffer.data[f.name].shape[1:]) != f.row_shape
            for f in table.fields
        ):
            buffer.data = {
                f.name: torch.from_numpy(np.zeros((buffer.size, *f.row_shape), dtype=f.dtype)) for f in table.fields
            }
        saved.read_into({name: t.numpy() for name, t in buffer.data.items()})
        buffer.pos, buffer.full = int(table.attrs["pos"]), bool(table.attrs["full"])


class _PytorchrlKind(BufferKind):
    """Any object with pytorchrl's ``get_all_buffer_data``/``insert_data_slice``/``reset``."""

    name = "storage.get_all_buffer_data"

    def matches(self, buffer: Any) -> bool:
        return all(callable(getattr(buffer, m, None)) for m in ("get_all_buffer_data", "insert_data_slice", "reset"))

    def restores_into(self, buffer: Any) -> bool:
        return all(callable(getattr(buffer, m, None)) for m in ("insert_data_slice", "reset"))

    def state(self, buffer: Any) -> BufferState:
        data = buffer.get_all_buffer_data(data_to_cpu=True)
        arrays, tensors = {}, []
        for name, value in dict(data).items():
            if isinstance(value, torch.Tensor):
                tensors.append(name)
                value = value.detach().cpu().numpy()
            if not isinstance(value, np.ndarray):
                raise TypeError(
                    f"get_all_buffer_data() of {type(buffer).__name__} returned {type(value).__name__} for "
                    f"{name!r}; a flat dict of tensors or arrays is needed"
                )
            arrays[name] = value
        counts = {a.shape[0] if a.ndim else -1 for a in arrays.values()}
        if len(counts) != 1 or -1 in counts:
            raise ValueError(f"get_all_buffer_data() returned fields with different numbers of rows: {counts}")
        attrs = {"tensors": tensors, "type": f"{type(buffer).__module__}.{type(buffer).__qualname__}"}
        return BufferState(arrays, counts.pop(), attrs)

    def restore(self, buffer: Any, saved: SavedBuffer) -> None:
        tensors = set(saved.attrs.get("tensors", ()))
        buffer.reset()
        for rows in saved.chunks():
            buffer.insert_data_slice({n: torch.from_numpy(a) if n in tensors else a for n, a in rows.items()})


_GENERIC = _PytorchrlKind()
#: The ring position, chunk ids and chunk digests of each buffer's last save in this process.
_TRACKER = Tracker()
register_buffer_kind(_TransitionStorageKind())


# -- saving and restoring -------------------------------------------------------------------------------------


def buffer_state(
    buffer: Any,
    *,
    chunk_rows: int | None = None,
    level: int = DEFAULT_LEVEL,
    hash_threads: int | None = None,
    changes: Literal["hash", "ring"] = "hash",
) -> ChunkedArrays:
    """Wrap ``buffer`` for :meth:`SnapshotStore.save`: it is stored as content-addressed chunks of rows.

    Args:
        buffer: an SB3 ``ReplayBuffer``/``DictReplayBuffer``, a :class:`TransitionStorage`, any object with
            pytorchrl's ``get_all_buffer_data``/``insert_data_slice``/``reset``, or a buffer of a kind
            registered with :func:`register_buffer_kind`.
        chunk_rows: transitions per chunk; by default as many as fit in 32 MiB. Keep it the same across the
            saves of a run, or no chunk is shared.
        level: zstd level of the chunks (1 by default, with a window of at least 2 MiB: faster than 3, and on
            replay buffers about as small).
        hash_threads: threads hashing, compressing and writing chunks; by default one per core, up to 8.
        changes: how the save finds the chunks that changed since the buffer's last save. ``"hash"`` hashes
            every chunk: whatever wrote the arrays, the snapshot holds what they hold. ``"ring"`` hashes only
            the chunks holding rows that the buffer's ring position says were written since its last save in
            this process (every chunk for buffers without a ring position): exact when every write went
            through the buffer's own methods (see docs/buffers.md for what else is caught, and what is not).

    Raises:
        TypeError: ``buffer`` is none of those kinds (SB3's ``HerReplayBuffer`` is not supported).
        ValueError: ``changes`` is neither ``"hash"`` nor ``"ring"``.
    """
    if changes not in ("hash", "ring"):
        raise ValueError(f"changes must be 'hash' or 'ring', not {changes!r}")
    for kind in _kinds():
        if kind.matches(buffer):
            state = kind.state(buffer)
            value = ChunkedArrays(
                state.arrays,
                state.rows,
                kind=kind.name,
                attrs=state.attrs,
                chunk_rows=chunk_rows,
                level=level,
                hash_threads=hash_threads,
                shifted=state.shifted,
            )
            # Recorded in either mode: a later "ring" save builds on the ids, a later save of either mode on the
            # digests of the chunks' rows.
            account = _TRACKER.account(
                buffer,
                value.arrays,
                value.rows,
                value.chunk_rows,
                state.ring,
                compare=changes == "ring",
                encoding=(_chunks.HASH, sorted(value.shifted.items())),  # what a chunk's id depends on
            )
            value.known, value.spot_check, value.on_hashed = account.known, account.spot_check, account.on_hashed
            value.previous = account.previous
            return value
    raise TypeError(
        f"cannot save a {type(buffer).__module__}.{type(buffer).__qualname__} as a buffer: pass an SB3 "
        "ReplayBuffer or DictReplayBuffer, a bucketsnap.buffers.TransitionStorage, or an object with "
        "get_all_buffer_data(), insert_data_slice() and reset()"
    )


def restore_buffer(
    url_or_store: str | SnapshotStore,
    buffer: Any,
    *,
    key: str = "replay_buffer",
    which: Which = "last",
    verify: bool = False,
) -> Any:
    """Restore the buffer saved under ``key`` in snapshot ``which`` into ``buffer``, in place; return it.

    Chunks are streamed (ranged reads, decompressed straight into the buffer's arrays on one thread per core,
    up to 8), so the restore needs a few MiB per thread beyond the buffer itself. Each chunk's size and zstd
    checksum are checked; with ``verify``, its hash against its id and its stored bytes against the CRC-32 in
    its name too. No pickle is involved.

    Raises:
        SnapshotNotFoundError: no such snapshot, or one of its chunks is missing.
        CorruptSnapshotError: a chunk or the chunk table does not match what was saved.
        ValueError: ``buffer`` is not the kind or shape of buffer that was saved.
        KeyError: the snapshot has no ``key``.
    """
    store = as_store(url_or_store)
    snapshot = store.open(which)
    where = f"{snapshot.info.url} member {key!r}"
    table = ChunkTable.parse(snapshot[key], where)
    kind = next((k for k in _kinds() if k.restores_into(buffer)), None)
    if kind is None:
        raise TypeError(f"cannot restore {where} into a {type(buffer).__name__}; see buffer_state() for the kinds")
    _expect(table, kind.name, where)
    _TRACKER.forget(buffer)  # its rows are about to be rewritten whatever its ring position says
    try:
        kind.restore(buffer, SavedBuffer(table, where, store.storage, verify))
    finally:
        _TRACKER.forget(buffer)
    return buffer


def _expect(table: ChunkTable, kind: str, where: str) -> None:
    if table.kind != kind:
        raise ValueError(f"{where} holds a {table.kind} buffer; it cannot be restored into a {kind}")


def _check_fields(table: ChunkTable, into: Mapping[str, np.ndarray], where: str) -> None:
    saved = {f.name: f for f in table.fields}
    if set(saved) != set(into):
        raise ValueError(f"{where} has fields {sorted(saved)}; the buffer has {sorted(into)}")
    for name, array in into.items():
        f = saved[name]
        if (
            array.dtype != f.dtype
            or tuple(array.shape[1:]) != f.row_shape
            or array.shape[0] < table.rows
            or not array.flags.c_contiguous
        ):
            raise ValueError(
                f"{where}: field {name!r} was saved as {f.dtype}{list(f.row_shape)} rows; the buffer holds "
                f"{array.dtype}{list(array.shape)}"
            )
