"""Which chunks of a ring buffer changed since its last save, from the buffer's own ring position.

Hashing a 5.6 GB buffer to find the two chunks that a thousand transitions changed costs a second or more per
save; the buffer's ring position says which rows its ``add`` wrote since the last save without reading them:
the rows from the position then to the position now. :func:`buffer_state(buffer, changes="ring")
<bucketsnap.buffers.buffer_state>` takes that account, so a save hashes only the chunks holding those rows.

The account is only as good as its premise, that every write since the last save went through the buffer's own
methods. What breaks it, and what is done about it:

* ``reset()`` (the position moves back, or ``full`` goes false): seen from the position, every chunk is hashed.
  A reset followed by a refill past the old position is invisible to SB3's ``pos``/``full``; buffers that count
  the rows they ever wrote (:class:`~bucketsnap.buffers.TransitionStorage`'s ``rows_written``) are exact there.
* a restore into the buffer through :func:`~bucketsnap.buffers.restore_buffer`: the record is forgotten.
* new arrays (another address, shape or dtype), another ``chunk_rows`` or other fields: every chunk is hashed.
* ``size`` rows or more written since the last save: every chunk is hashed when the buffer counts its writes;
  SB3's position cannot tell a whole turn of the ring from none.
* direct writes into the arrays (``buffer.rewards[5] = 1``), writes by another process into shared memory, and
  device (DMA) writes are not seen by the position.

For what the position cannot see, every save also compares, for each chunk it does not hash, a fingerprint of
that chunk's first and last rows with the one taken when it was last hashed (a reset and refill, or a whole turn
of the ring, rewrites those rows), and hashes :data:`SPOT_CHECKS` whole chunks in rotation; a mismatch warns and
hashes every chunk for that save. A direct write into rows that are neither is still saved late: by the save
whose rotation reaches its chunk, or by a save that hashes everything (``changes="hash"``, the default).

The record also keeps, for every chunk whose rows the save read, their XXH3-128 with the id of those same bytes
(``contents``), for buffers with or without a ring position: a later save in either mode reads a chunk's rows
(XXH3-128, about 5x faster than BLAKE3 here) and takes the recorded id where they match, hashing with BLAKE3
only the chunks whose rows changed. Unlike the ring's account, this sees every write, however it was made, and
it holds no array: a digest and an id of the same bytes stay true of any arrays of the same fields, dtypes,
row shapes and chunking, wherever they lie (a buffer whose kind hands over fresh copies, as pytorchrl's does
from a device, is not kept alive by its record).
"""

from __future__ import annotations

import contextlib
import threading
import warnings
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import blake3
import numpy as np

__all__ = ["SPOT_CHECKS", "Ring", "Tracker", "changed_rows"]

#: Chunks a ring-tracked save hashes whole although the ring position says they are unchanged, in rotation.
SPOT_CHECKS = 2

Bounds = tuple[int, int]


@dataclass(frozen=True)
class Ring:
    """Where a ring buffer stands: it writes row ``pos`` next, its physical rows are ``[0, size)``.

    Attributes:
        size: capacity, in rows.
        pos: the next row written.
        full: whether every row holds a transition.
        written: rows ever written (across resets), if the buffer counts them: then the rows written since the
            last save are known exactly, however many there were.
    """

    size: int
    pos: int
    full: bool
    written: int | None = None


def changed_rows(before: Ring, now: Ring) -> list[Bounds] | None:
    """The physical rows written between ``before`` and ``now``, or None if they may be any row.

    The row at ``now.pos`` is counted as written too: SB3's ``optimize_memory_usage`` stores the next
    observation of the newest transition there.
    """
    size = now.size
    if before.size != size or size < 1:
        return None
    if before.written is not None and now.written is not None:
        count = now.written - before.written
        if count < 0:
            return None
    elif (before.full and not now.full) or (not before.full and not now.full and now.pos < before.pos):
        return None  # reset
    elif not before.full and now.full:
        count = size - before.pos + now.pos
    else:
        count = (now.pos - before.pos) % size
    if count + 1 >= size:
        return None
    first = (now.pos - count) % size
    last = first + count + 1  # exclusive, one row past the newest
    if last <= size:
        return [(first, last)]
    return [(first, size), (0, last - size)]


@dataclass
class _Record:
    """What a buffer held when its chunks were last hashed."""

    ring: Ring | None
    layout: tuple[Any, ...]
    arrays: list[Callable[[], Any]]
    ids: dict[Bounds, str]
    fingerprints: dict[Bounds, str]
    rotation: int = 0
    #: Chunk bounds -> (XXH3-128 of the chunk's rows, its id), both of the same bytes: valid for any arrays of
    #: the same ``signature``, wherever they lie in memory.
    contents: dict[Bounds, tuple[str, str]] = field(default_factory=dict)
    signature: tuple[Any, ...] = ()


@dataclass
class _Account:
    """What a save of a ring-tracked buffer may take as known, and how it reports what it hashed."""

    known: dict[Bounds, str]
    spot_check: list[Bounds]
    on_hashed: Callable[[dict[Bounds, str], dict[Bounds, tuple[str, str]]], None]
    #: The last save's XXH3-128 of each chunk's rows, with the id of those rows.
    previous: dict[Bounds, tuple[str, str]] = field(default_factory=dict)


class Tracker:
    """Per buffer (weakly held), the ring position, chunk ids and content digests of its last hashed save."""

    def __init__(self) -> None:
        self._records: weakref.WeakKeyDictionary[Any, _Record] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def forget(self, buffer: Any) -> None:
        """Forget ``buffer``'s record (its arrays were written by something other than its ring)."""
        with self._lock, contextlib.suppress(TypeError):  # not weakly referenceable: never recorded
            self._records.pop(buffer, None)

    def account(
        self,
        buffer: Any,
        arrays: Mapping[str, np.ndarray],
        rows: int,
        chunk_rows: int,
        ring: Ring | None,
        *,
        compare: bool = True,
        encoding: Any = None,
    ) -> _Account:
        """The chunks of ``buffer`` (``rows`` rows in chunks of ``chunk_rows``) known unchanged since its last
        hashed save (none unless ``compare`` and the buffer has a ``ring``), the digests of what its chunks held
        then, and the callback that records this save's. ``encoding`` (anything comparable: how rows become
        chunk objects) must be the same as then for either to apply."""
        layout = (_layout(arrays, chunk_rows), encoding)
        # What a chunk's id depends on besides its rows' bytes: the digests apply to any arrays that match it.
        signature = (chunk_rows, tuple((name, a.shape[1:], a.dtype.str) for name, a in arrays.items()), encoding)
        # Only the ring's account needs the arrays to stay where they are; a buffer without a ring position may
        # hand over fresh copies (pytorchrl's from a device), which a reference here would keep alive.
        refs = [_weak(a) for a in arrays.values()] if ring is not None else []
        with self._lock:
            try:
                record = self._records.get(buffer)
            except TypeError:
                record = None
        bounds = [(a, min(a + chunk_rows, rows)) for a in range(0, rows, chunk_rows)]
        # Taken now, with the rows this save will hold: a background save hashes its copy later.
        fingerprints = {b: _fingerprint(arrays, *b) for b in bounds} if ring is not None else {}
        known: dict[Bounds, str] = {}
        spot: list[Bounds] = []
        previous = dict(record.contents) if record is not None and record.signature == signature else {}
        applies = record is not None and record.layout == layout and all(r() is not None for r in record.arrays)
        if compare and record is not None and applies and record.ring is not None and ring is not None:
            changed = changed_rows(record.ring, ring)
            if changed is not None:
                for b in bounds:
                    if b in record.ids and not any(b[0] < end and start < b[1] for start, end in changed):
                        if fingerprints[b] != record.fingerprints.get(b):
                            warnings.warn(
                                f"rows {b[0]}-{b[1] - 1} of a {type(buffer).__name__} changed though its ring "
                                "position says they were not written since its last save (a reset and refill, a "
                                "whole turn of the ring, or a direct write into its arrays): every chunk is hashed "
                                "for this save; use buffer_state(buffer, changes='hash') if its arrays are written "
                                "directly",
                                RuntimeWarning,
                                stacklevel=3,
                            )
                            known = {}
                            break
                        known[b] = record.ids[b]
                if known:
                    order = sorted(known)
                    spot = [order[(record.rotation + i) % len(order)] for i in range(min(SPOT_CHECKS, len(order)))]
        rotation = 0 if record is None else record.rotation + SPOT_CHECKS

        def on_hashed(ids: dict[Bounds, str], contents: dict[Bounds, tuple[str, str]]) -> None:
            entry = _Record(ring, layout, refs, dict(ids), fingerprints, rotation, dict(contents), signature)
            with self._lock, contextlib.suppress(TypeError):  # not weakly referenceable: not tracked
                self._records[buffer] = entry

        return _Account(known, spot, on_hashed, previous)


def _layout(arrays: Mapping[str, np.ndarray], chunk_rows: int) -> tuple[Any, ...]:
    """What must stay the same for a record to apply: the arrays' memory, shapes, dtypes; the chunking."""
    return (
        chunk_rows,
        tuple((name, a.__array_interface__["data"][0], a.shape, a.strides, a.dtype.str) for name, a in arrays.items()),
    )


def _weak(array: np.ndarray) -> Callable[[], Any]:
    """A reference to the object owning ``array``'s memory: weak for a numpy array (dead once it is freed),
    strong otherwise (a tensor's numpy view is owned by a fresh alias of the tensor), so that the memory's
    address cannot be reused by other arrays while the record stands."""
    owner: Any = array
    while isinstance(owner, np.ndarray) and owner.base is not None:
        owner = owner.base
    if isinstance(owner, np.ndarray):
        return weakref.ref(owner)
    return lambda: owner


def _fingerprint(arrays: Mapping[str, np.ndarray], start: int, end: int) -> str:
    """BLAKE3 of the first and last row of rows ``[start, end)`` of every field."""
    digest = blake3.blake3()
    for a in arrays.values():
        for row in {start, end - 1}:
            digest.update(np.ascontiguousarray(a[row]).reshape(-1).view(np.uint8).data)
    return str(digest.hexdigest())
