"""What every save does before it commits: validate the request, encode the state, write an archive.

The first and second steps of the save pipeline (:mod:`bucketsnap._pipeline`), for a process alone and for
each rank of a distributed save alike: one definition of a valid itr, key and metric, of the part of a state
one process writes (:class:`Share`), and of the archive and ``meta.json`` it writes. Nothing here reads the
manifest or decides a name: the pipeline does.
"""

from __future__ import annotations

import numbers
import platform
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from bucketsnap._archive import ArchiveWriter
from bucketsnap._info import MemberInfo, Metric, check_metrics
from bucketsnap._progress import ByteCounter, ProgressCallback
from bucketsnap._storage import Storage
from bucketsnap._version import __version__
from bucketsnap.errors import StorageError

if TYPE_CHECKING:  # _values imports torch: only what encodes imports it
    from bucketsnap._values import EncodedValue, HostBuffer

__all__ = [
    "ExternalValue",
    "Prepared",
    "Share",
    "StoredObjects",
    "WrittenArchive",
    "alone",
    "check_itr",
    "check_state",
    "meta",
    "prepare",
    "prepare_value",
    "write_archive",
]

_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}$")


@dataclass(frozen=True)
class StoredObjects:
    """What a save may reuse of the objects already stored, and how it names the objects it writes.

    gc deletes only objects no committed snapshot needs, and orders its deletions against commits through the
    manifest log, so a save may reuse an object only if the generation it started from references it, and
    must give each object it writes a name no other save uses (see :mod:`bucketsnap._maintenance`).

    Attributes:
        committed: the objects (relative paths) that the generation the save started from references.
        token: a random string unique to this save, part of the name of every object it writes.
    """

    committed: frozenset[str]
    token: str


@runtime_checkable
class ExternalValue(Protocol):
    """A state value stored partly in objects of its own, such as a replay buffer's content-addressed chunks.

    The store calls :meth:`host_copy` in the caller's thread for :meth:`SnapshotStore.save_async`, then
    :meth:`write_objects` before it writes the archive: the returned value becomes the key's member, and the
    returned paths (relative to the run) the snapshot's ``refs``, so gc and delete keep those objects while any
    committed snapshot needs them. Objects are written before the commit and never deleted by a failed save
    (another snapshot may share them); gc removes them once no committed snapshot refers to them. Only objects
    in ``objects.committed`` may be reused; new ones are named with ``objects.token`` (:class:`StoredObjects`).
    """

    def host_copy(self) -> ExternalValue:
        """A copy that stays valid while the caller changes the original (for background saves)."""
        ...

    def write_objects(self, storage: Storage, objects: StoredObjects) -> tuple[Any, list[str]]:
        """Write the objects that are missing; return the member value and every object path it needs."""
        ...


@dataclass(frozen=True)
class Share:
    """The part of a save's state one process writes, and what the ranks of a distributed save agree on.

    A process saving alone writes every key (:func:`alone`); a rank of a distributed save writes its
    :class:`~bucketsnap.Sharded` values and the replicated keys assigned to it (``bucketsnap._distributed_save``).

    Attributes:
        members: member name -> value, for the members this process writes.
        layout: every top-level key, with whether it is sharded, in the caller's order.
        sizes: replicated key -> bytes of tensors and arrays (the same on every rank, or the ranks disagree).
        names: every member name of the snapshot, over all ranks, in the order its manifest entry lists them.
    """

    members: Mapping[str, Any]
    layout: tuple[tuple[str, bool], ...]
    sizes: Mapping[str, int]
    names: tuple[str, ...]


def alone(state: Mapping[str, Any]) -> Share:
    """The share of a process saving alone: the whole state, each key one member."""
    return Share(state, tuple((key, False) for key in state), {}, tuple(state))


@dataclass(frozen=True)
class Prepared:
    """A validated, encoded save (this process's share of it), ready to be written by any thread.

    ``layout``, ``sizes`` and ``names`` are as in :class:`Share`; left empty, the snapshot's members are
    ``values``, in their order.
    """

    itr: int
    values: dict[str, EncodedValue | ExternalValue]
    metrics: dict[str, Metric]
    overwrite: bool
    layout: tuple[tuple[str, bool], ...] = ()
    sizes: Mapping[str, int] = field(default_factory=dict)
    names: tuple[str, ...] = ()


def prepare(
    itr: Any,
    state: Any,
    metrics: Mapping[str, Any] | None,
    *,
    overwrite: bool,
    copy: bool,
    host_buffer: HostBuffer | None = None,
    share: Callable[[Mapping[str, Any]], Share] = alone,
) -> Prepared:
    """Validate a save request and encode this process's ``share`` of its state (``copy``: into private host
    memory, taken from ``host_buffer`` when given; see :func:`bucketsnap._values.encode`)."""
    itr = check_itr(itr)
    check_state(state)
    metric_values = check_metrics(dict(metrics or {}))
    part = share(state)
    values = {name: prepare_value(value, copy=copy, host_buffer=host_buffer) for name, value in part.members.items()}
    return Prepared(itr, values, metric_values, overwrite, part.layout, part.sizes, part.names)


def prepare_value(value: Any, *, copy: bool, host_buffer: HostBuffer | None = None) -> EncodedValue | ExternalValue:
    """Encode one top-level value, or (for an :class:`ExternalValue`) take it, or its host copy, as it is."""
    if isinstance(value, ExternalValue):
        return value.host_copy() if copy else value
    from bucketsnap._values import encode

    return encode(value, copy=copy, host_buffer=host_buffer)


def meta(itr: int, created: datetime, metrics: dict[str, Any]) -> dict[str, Any]:
    """The ``meta.json`` of an archive, less the member table the archive writer adds."""
    import numpy as np
    import torch

    return {
        "format": "bucketsnap",
        "itr": itr,
        "created": created.isoformat(),
        "metrics": metrics,
        # tensor data is written in this machine's byte order (numpy arrays carry theirs in their dtype)
        "byteorder": sys.byteorder,
        "library": {
            "bucketsnap": __version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
    }


def check_itr(itr: Any) -> int:
    """``itr`` as an int, or ValueError if it is not a non-negative integer."""
    if isinstance(itr, bool) or not isinstance(itr, numbers.Integral) or itr < 0:
        raise ValueError(f"itr must be a non-negative int, not {itr!r}")
    return int(itr)


def check_state(state: Any) -> None:
    """ValueError unless ``state`` is a non-empty mapping whose keys are valid member names."""
    if not isinstance(state, Mapping):
        raise ValueError(f"state must be a dict of key -> value, not {type(state).__name__}")
    if not state:
        raise ValueError("state is empty: pass at least one key, such as {'policy': model.state_dict()}")
    for key in state:
        if not isinstance(key, str) or not _KEY.match(key):
            raise ValueError(
                f"state key {key!r} is not a valid member name: use 1-200 letters, digits, '_', '-' or '.', "
                "not starting with '.' or '-'"
            )


@dataclass(frozen=True)
class WrittenArchive:
    """An archive stored at ``path`` (not yet committed): what its manifest entry needs.

    ``checksum`` is the CRC-32 of every byte of the archive, ``"crc32:<8 hex>"``, computed as it was written:
    the entry records it as ``SnapshotInfo.checksums[path]``.
    """

    path: str
    size: int
    members: dict[str, MemberInfo]
    refs: tuple[str, ...]
    checksum: str


def write_archive(
    storage: Storage,
    path: str,
    values: Mapping[str, EncodedValue | ExternalValue],
    archive_meta: dict[str, Any],
    *,
    level: int,
    threads: int,
    objects: StoredObjects,
    progress: ProgressCallback | None = None,
) -> WrittenArchive:
    """Write ``values`` as the archive ``path``: external values' objects first, then the archive itself.

    Raises:
        StorageError: the backend failed, or kept other bytes than were written (then nothing is left at
            ``path``, so it can never be committed).
    """
    from bucketsnap._values import EncodedValue, encode

    refs: set[str] = set()
    encoded: dict[str, EncodedValue] = {}
    for key, value in values.items():
        if isinstance(value, EncodedValue):
            encoded[key] = value
        else:  # a replay buffer's chunks and the like: objects of their own, then a small member
            member, paths = value.write_objects(storage, objects)
            encoded[key] = encode(member)
            refs.update(paths)
    counter = None if progress is None else ByteCounter(sum(v.raw_size for v in encoded.values()), progress)
    with storage.write(path) as f:
        writer = ArchiveWriter(f, level=level, threads=threads, progress=None if counter is None else counter.add)
        try:
            for key, value in encoded.items():
                writer.add_encoded(key, value)
            # refs go into meta.json too, so that repair() recovers a snapshot with the chunks it needs
            size = writer.finish({**archive_meta, **({"refs": sorted(refs)} if refs else {})})
        except BaseException:
            writer.abandon()
            raise
    try:
        stored = storage.size(path)
    except FileNotFoundError:  # gc(min_age=0), which fails saves in flight, or a delete by hand, between the two
        raise StorageError(
            f"not committed to {storage.url_of('')}: gc deleted or may have deleted the archive this save had just "
            f"written ({path}: gc(min_age=0) deletes the objects of saves in flight); retry the save"
        ) from None
    if stored != size:  # an upload that reported success but kept other bytes: never commit it
        storage.delete(path)
        raise StorageError(
            f"{storage.url_of(path)} holds {stored} bytes after writing {size}; nothing was committed. Retry the save."
        )
    assert writer.checksum is not None  # set by finish()
    return WrittenArchive(path, size, dict(writer.members), tuple(sorted(refs)), writer.checksum)
