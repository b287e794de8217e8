"""Replay buffers and rollout storages saved as chunked members: incremental saves, streamed restores.

Three kinds of buffer are understood:

* SB3's ``ReplayBuffer`` and ``DictReplayBuffer`` (SB3 itself is never imported here unless the buffer came
  from it): every array is saved in its physical ring layout with ``pos`` and ``full``, and restored in place
  into a buffer of the same shape, so a buffer that has wrapped around comes back exact.
* :class:`TransitionStorage`, a ring storage in the spirit of pytorchrl's ``Storage`` (``insert_transition``,
  ``insert_data_slice``, ``get_all_buffer_data``, ``reset``), saved the same way.
* Any other object with pytorchrl's ``get_all_buffer_data``, ``insert_data_slice`` and ``reset``: what
  ``get_all_buffer_data(data_to_cpu=True)`` returns is saved, and a restore calls ``reset()`` then
  ``insert_data_slice`` once per chunk, so it never needs the whole buffer twice in memory.

Wrap the buffer with :func:`buffer_state` in the state you save, and bring it back with :func:`restore_buffer`::

    store.save(itr, {"policy": policy.state_dict(), "replay_buffer": buffer_state(buffer)})
    restore_buffer(store, buffer)

The buffer's rows are stored as content-addressed chunks shared by the run's snapshots
(:mod:`bucketsnap.chunks`): a save after a thousand new transitions uploads the few chunks that changed.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from bucketsnap.chunks import ChunkedArrays, ChunkTable, read_chunks
from bucketsnap.store import SnapshotStore, as_store

__all__ = ["TransitionStorage", "buffer_state", "restore_buffer"]

Which = int | str

_SB3_PLAIN = "sb3.ReplayBuffer"
_SB3_DICT = "sb3.DictReplayBuffer"
_STORAGE = "bucketsnap.TransitionStorage"
_GENERIC = "storage.get_all_buffer_data"


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
        total = self.pos + n
        if total >= self.size:
            self.full = True
        self.pos = total % self.size

    def _check_fields(self, sample: Mapping[str, Any]) -> None:
        if set(sample) != set(self.data):
            raise KeyError(f"transition fields {sorted(sample)} differ from the storage's {sorted(self.data)}")


# -- saving ---------------------------------------------------------------------------------------------------


def buffer_state(buffer: Any, *, chunk_rows: int | None = None, level: int = 3) -> ChunkedArrays:
    """Wrap ``buffer`` for :meth:`SnapshotStore.save`: it is stored as content-addressed chunks of rows.

    Args:
        buffer: an SB3 ``ReplayBuffer``/``DictReplayBuffer``, a :class:`TransitionStorage`, or any object with
            pytorchrl's ``get_all_buffer_data``/``insert_data_slice``/``reset``.
        chunk_rows: transitions per chunk; by default as many as fit in 32 MiB. Keep it the same across the
            saves of a run, or no chunk is shared.
        level: zstd level of the chunks.

    Raises:
        TypeError: ``buffer`` is none of those kinds (SB3's ``HerReplayBuffer`` is not supported).
    """
    kind = _sb3_kind(buffer)
    if kind is not None:
        arrays = _sb3_arrays(buffer)
        size = int(buffer.buffer_size)
        rows = size if buffer.full else int(buffer.pos)
        if buffer.optimize_memory_usage and not buffer.full:
            rows = min(rows + 1, size)  # the next observation of the newest transition lives one row further
        attrs: dict[str, Any] = {
            "pos": int(buffer.pos),
            "full": bool(buffer.full),
            "buffer_size": size,
            "n_envs": int(buffer.n_envs),
            "optimize_memory_usage": bool(buffer.optimize_memory_usage),
            "handle_timeout_termination": bool(buffer.handle_timeout_termination),
        }
        return ChunkedArrays(arrays, rows, kind=kind, attrs=attrs, chunk_rows=chunk_rows, level=level)
    if isinstance(buffer, TransitionStorage):
        arrays = {name: t.numpy() for name, t in buffer.data.items()}
        rows = buffer.size if buffer.full else buffer.pos
        attrs = {"pos": buffer.pos, "full": buffer.full, "size": buffer.size}
        if not arrays:
            raise ValueError("the TransitionStorage is empty and has no fields yet: insert a transition first")
        return ChunkedArrays(arrays, rows, kind=_STORAGE, attrs=attrs, chunk_rows=chunk_rows, level=level)
    if all(callable(getattr(buffer, m, None)) for m in ("get_all_buffer_data", "insert_data_slice", "reset")):
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
        return ChunkedArrays(arrays, counts.pop(), kind=_GENERIC, attrs=attrs, chunk_rows=chunk_rows, level=level)
    raise TypeError(
        f"cannot save a {type(buffer).__module__}.{type(buffer).__qualname__} as a buffer: pass an SB3 "
        "ReplayBuffer or DictReplayBuffer, a bucketsnap.buffers.TransitionStorage, or an object with "
        "get_all_buffer_data(), insert_data_slice() and reset()"
    )


def _sb3_kind(buffer: Any) -> str | None:
    if "stable_baselines3" not in sys.modules:
        return None  # the buffer cannot come from SB3 if SB3 was never imported
    from stable_baselines3.common.buffers import DictReplayBuffer, ReplayBuffer
    from stable_baselines3.her.her_replay_buffer import HerReplayBuffer

    if isinstance(buffer, HerReplayBuffer):
        raise TypeError("SB3's HerReplayBuffer is not supported yet: save it with model.save_replay_buffer()")
    if isinstance(buffer, DictReplayBuffer):
        return _SB3_DICT
    if isinstance(buffer, ReplayBuffer):
        return _SB3_PLAIN
    return None


def _sb3_arrays(buffer: Any) -> dict[str, np.ndarray]:
    """The arrays of an SB3 replay buffer, by field name; dict observations as ``observations/<key>``."""
    arrays: dict[str, np.ndarray] = {}
    for attr in ("observations", "next_observations"):
        value = getattr(buffer, attr, None)
        if isinstance(value, dict):
            arrays.update({f"{attr}/{k}": v for k, v in value.items()})
        elif value is not None and not (attr == "next_observations" and buffer.optimize_memory_usage):
            arrays[attr] = value
    for attr in ("actions", "rewards", "dones", "timeouts"):
        arrays[attr] = getattr(buffer, attr)
    return arrays


# -- restoring ------------------------------------------------------------------------------------------------


def restore_buffer(
    url_or_store: str | SnapshotStore,
    buffer: Any,
    *,
    key: str = "replay_buffer",
    which: Which = "last",
    verify: bool = False,
) -> Any:
    """Restore the buffer saved under ``key`` in snapshot ``which`` into ``buffer``, in place; return it.

    Chunks are streamed one at a time (ranged reads, decompressed straight into the buffer's arrays), so the
    restore needs about one chunk of memory beyond the buffer itself. Each chunk's size and zstd checksum are
    checked; with ``verify``, its sha256 against its id too (about twice the CPU time of the restore itself).
    No pickle is involved.

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
    storage = store.storage
    kind = _sb3_kind(buffer)
    if kind is not None:
        _expect(table, kind, where)
        attrs = table.attrs
        for name in ("buffer_size", "n_envs", "optimize_memory_usage"):
            ours = getattr(buffer, name)
            if attrs.get(name) != ours:
                raise ValueError(
                    f"{where} was saved from a buffer with {name}={attrs.get(name)!r}; this one has {ours!r}"
                )
        into = _sb3_arrays(buffer)
        _check_fields(table, into, where)
        for _ in read_chunks(storage, table, where=where, into=into, verify=verify):
            pass
        buffer.pos, buffer.full = int(attrs["pos"]), bool(attrs["full"])
        return buffer
    if isinstance(buffer, TransitionStorage):
        _expect(table, _STORAGE, where)
        if table.attrs.get("size") != buffer.size:
            raise ValueError(
                f"{where} was saved from a storage of size {table.attrs.get('size')}; this one has {buffer.size}"
            )
        if set(buffer.data) != {f.name for f in table.fields} or any(
            buffer.data[f.name].numpy().dtype != f.dtype or tuple(buffer.data[f.name].shape[1:]) != f.row_shape
            for f in table.fields
        ):
            buffer.data = {
                f.name: torch.from_numpy(np.zeros((buffer.size, *f.row_shape), dtype=f.dtype)) for f in table.fields
            }
        into = {name: t.numpy() for name, t in buffer.data.items()}
        for _ in read_chunks(storage, table, where=where, into=into, verify=verify):
            pass
        buffer.pos, buffer.full = int(table.attrs["pos"]), bool(table.attrs["full"])
        return buffer
    if all(callable(getattr(buffer, m, None)) for m in ("insert_data_slice", "reset")):
        _expect(table, _GENERIC, where)
        tensors = set(table.attrs.get("tensors", ()))
        buffer.reset()
        for _, rows in read_chunks(storage, table, where=where, verify=verify):
            buffer.insert_data_slice({n: torch.from_numpy(a) if n in tensors else a for n, a in rows.items()})
        return buffer
    raise TypeError(f"cannot restore {where} into a {type(buffer).__name__}; see buffer_state() for the kinds")


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
