"""The storage layout of :mod:`bucketsnap.dcp`: one archive member per DCP write item, DCP's ``Metadata`` as JSON.

Each rank's archive holds one member per write item of its plan, as any bucketsnap archive does (a zstd frame of
the payload described in :mod:`bucketsnap._values`), but always in the *stored* layout of
:class:`bucketsnap._archive._StoredFrame`: raw blocks of 128 KiB, each behind a 3-byte header. So the position
of any byte of a tensor is known from the member's offset alone, and a reader fetches exactly the bytes of the
rows it needs (:func:`read_tensor`), with no index to read first. The trade-off: DCP members are never
compressed (weights and optimizer moments gain about 10 % from zstd, at several times the cost of the write).

DCP's :class:`~torch.distributed.checkpoint.metadata.Metadata` is stored as a bucketsnap value (a JSON tree, no
pickle) by :func:`metadata_tree`: tensor properties, chunk offsets and sizes, each item's location, and the
planner's ``planner_data`` (the default planner's is tuples of strings and ints). Only a custom planner's
``planner_data`` of other types would be cloudpickled, and loading it then needs ``allow_pickle=True``.
Non-tensor values (DCP's ``BYTE_IO`` items, which DCP's planners ``torch.save``) are decoded in the saving process
and stored through bucketsnap's codecs too, so that loading them executes no code from the bucket.

This module reads and writes through :class:`~bucketsnap._storage.Storage` and the zip writer; it knows no store.
"""

from __future__ import annotations

import io
import json
import math
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from bucketsnap._archive import META_NAME, _StoredFrame, load_member, member_name
from bucketsnap._info import MemberInfo, crc32_checksum
from bucketsnap._pools import Pool
from bucketsnap._storage import Storage
from bucketsnap._values import MAGIC, EncodedValue, encode
from bucketsnap._zipformat import ZipStreamWriter, crc32_combine
from bucketsnap.errors import CorruptSnapshotError, StorageError

__all__ = [
    "METADATA_KEY",
    "Item",
    "WrittenItems",
    "metadata_from_tree",
    "metadata_tree",
    "read_tensor",
    "write_items",
]

#: The member of the snapshot's own archive that holds DCP's Metadata.
METADATA_KEY = "dcp-metadata"
#: Format of the tree :func:`metadata_tree` writes; a reader refuses any other.
TREE_FORMAT = "bucketsnap.dcp/1"

_BLOCK = _StoredFrame._BLOCK
_FRAME_HEADER = _StoredFrame._HEADER.size
_PAYLOAD_PREFIX = len(MAGIC) + 8  # magic, then the header's 8-byte length
#: Ranges above this are read in pieces of this size, :data:`READ_THREADS` at a time.
PIECE = 8 * 2**20
READ_THREADS = 8


@dataclass(frozen=True)
class Item:
    """Where one write item is stored: its member, and for a tensor the payload offset, shape and dtype."""

    key: str
    member: MemberInfo
    data_start: int | None = None  # payload offset of the tensor's first byte; None: a non-tensor value
    shape: tuple[int, ...] = ()
    dtype: str = ""

    def to_json(self) -> dict[str, Any]:
        """Without the member's location: the manifest holds it (a copy of the snapshot moves it)."""
        out: dict[str, Any] = {"key": self.key}
        if self.data_start is not None:
            out.update(data_start=self.data_start, shape=list(self.shape), dtype=self.dtype)
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any], members: Mapping[str, MemberInfo], own: str) -> Item:
        """The item ``d`` describes, located by ``members`` (the manifest's; ``own``: the snapshot's archive)."""
        key = str(d["key"])
        member = members[key]
        start = d.get("data_start")
        return cls(
            key,
            member if member.path is not None else replace(member, path=own),
            None if start is None else int(start),
            tuple(int(n) for n in d.get("shape", ())),
            str(d.get("dtype", "")),
        )


@dataclass(frozen=True)
class WrittenItems:
    """One rank's archive, written: its size and checksum, and where each item went."""

    path: str
    size: int
    checksum: str
    items: dict[str, Item]  # member key -> item


def write_items(
    storage: Storage, path: str, values: list[tuple[str, Any]], archive_meta: dict[str, Any]
) -> WrittenItems:
    """Write ``(key, value)`` pairs (tensors, or any value bucketsnap encodes) as the archive ``path``.

    Raises:
        StorageError: the backend failed, or kept other bytes than were written.
    """
    items: dict[str, Item] = {}
    with storage.write(path) as f:
        zip_ = ZipStreamWriter(f)
        for key, value in values:
            tensor = value if isinstance(value, torch.Tensor) else None
            if tensor is not None:
                tensor = tensor.detach().cpu().contiguous()
                if type(tensor) is not torch.Tensor:
                    tensor = torch.Tensor(tensor)  # a Parameter, or another subclass: its data only
            encoded = encode(tensor if tensor is not None else value)
            member = _write_member(zip_, member_name(key), encoded)
            if tensor is None:
                items[key] = Item(key, member)
            else:
                dtype = str(tensor.dtype).removeprefix("torch.")
                items[key] = Item(key, member, _PAYLOAD_PREFIX + len(encoded.header), tuple(tensor.shape), dtype)
        table = {k: item.member.to_json() for k, item in items.items()}
        zip_.add_bytes(META_NAME, json.dumps({**archive_meta, "members": table}, indent=1, sort_keys=True).encode())
        size = zip_.close()
        checksum = crc32_checksum(zip_.crc)
    stored = storage.size(path)
    if stored != size:
        storage.delete(path)
        raise StorageError(f"{storage.url_of(path)} holds {stored} bytes after writing {size}; nothing was committed")
    return WrittenItems(path, size, checksum, items)


def _write_member(zip_: ZipStreamWriter, name: str, encoded: EncodedValue) -> MemberInfo:
    sink = zip_.open_member(name, zip64=encoded.raw_size > 2**31)
    offset = sink.tell()
    with _StoredFrame(sink, encoded.raw_size) as frame:
        for chunk in encoded.chunks():  # the header, then each buffer: each begins a block (see _tensor_start)
            frame.write(chunk)
    zip_.close_member(sink)
    return MemberInfo(
        name=name,
        offset=offset,
        stored_size=sink.size,
        raw_size=encoded.raw_size,
        crc32=f"{sink.crc:08x}",
        pickled=encoded.pickled,
    )


# -- reading ---------------------------------------------------------------------------------------------------


ReadRange = Callable[[int, int], bytes]


def _tensor_start(data_start: int) -> int:
    """The offset, in an item's stored frame, of its tensor's first block header: the frame header, then the
    payload's header as one block of its own (:func:`_write_member` writes it as one piece)."""
    return _FRAME_HEADER + 3 + data_start


def _is_stored_frame(member: MemberInfo, data_start: int) -> bool:
    """Whether ``member`` has the layout :func:`_write_member` gives a tensor item (else it is read whole)."""
    nbytes = member.raw_size - data_start
    return nbytes > 0 and member.stored_size == _tensor_start(data_start) + nbytes + 3 * -(-nbytes // _BLOCK) + 3


def _read_blocks(
    read: ReadRange, member: MemberInfo, data_start: int, start: int, end: int, out: memoryview, *, whole: bool
) -> None:
    """Tensor bytes ``[start, end)`` of a stored item into ``out``, reading exactly the blocks that hold them.

    The blocks go in groups of :data:`PIECE` bytes, one ranged request each, :data:`READ_THREADS` at a time
    (one GET of a large tensor is several times slower on S3 than a few in parallel); each group's bytes are
    copied out of their blocks straight into ``out``. With ``whole``, the groups cover every byte of the member,
    whose CRC-32 is checked.
    """
    tensor_at = member.offset + _tensor_start(data_start)  # the first block's header
    first, stop = start // _BLOCK, (end - 1) // _BLOCK + 1
    step = max(1, PIECE // _BLOCK)
    groups = [(k, min(k + step, stop)) for k in range(first, stop, step)]

    def stored(q: int) -> int:  # the stored offset of tensor byte q
        return tensor_at + (q // _BLOCK) * (_BLOCK + 3) + 3 + q % _BLOCK

    def fetch(group: int) -> tuple[int, int]:
        ka, kb = groups[group]
        lo, hi = max(start, ka * _BLOCK), min(end, kb * _BLOCK)
        s, e = stored(lo), stored(hi - 1) + 1
        if whole:
            s = member.offset if group == 0 else tensor_at + ka * (_BLOCK + 3)
            if group == len(groups) - 1:
                e = member.offset + member.stored_size  # the empty last block too
        data = memoryview(read(s, e))
        if len(data) != e - s:
            raise CorruptSnapshotError(f"short read: {len(data)} of {e - s} bytes")
        i, q = stored(lo) - s, lo
        while q < hi:
            n = min((q // _BLOCK + 1) * _BLOCK, hi) - q
            out[q - start : q - start + n] = data[i : i + n]
            i, q = i + n + 3, q + n  # past the next block's header
        return zlib.crc32(data), len(data)

    if len(groups) == 1:
        parts = [fetch(0)]
    else:
        with Pool(max_workers=READ_THREADS) as pool:
            parts = list(pool.map(fetch, range(len(groups))))
    if whole:
        crc, size = parts[0]
        for part_crc, part_size in parts[1:]:
            crc, size = crc32_combine(crc, part_crc, part_size), size + part_size
        if size != member.stored_size or f"{crc & 0xFFFFFFFF:08x}" != member.crc32:
            raise CorruptSnapshotError(f"checksum mismatch (crc32 {crc & 0xFFFFFFFF:08x}, expected {member.crc32})")


def read_tensor(
    read: ReadRange,
    item: Item,
    offsets: tuple[int, ...],
    lengths: tuple[int, ...],
    *,
    where: str,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The part ``[offsets, offsets + lengths)`` of the stored tensor ``item``, reading only its bytes.

    The bytes read are those from the part's first element to its last in the tensor's C order: exactly the
    part when it is a block of rows (a dim-0 shard). A whole tensor is read with its member's few header bytes
    and checked against the member's CRC-32; a part is not checked (``verify`` checks every byte). A member not
    in the stored layout (none that bucketsnap.dcp writes) is read whole and decoded. The bytes go straight into
    ``out`` where it is a contiguous CPU tensor of the part's shape and dtype (then ``out`` is returned).
    """
    shape, member = item.shape, item.member
    dtype = getattr(torch, item.dtype, None)
    if not isinstance(dtype, torch.dtype) or item.data_start is None:
        raise CorruptSnapshotError(f"{where}: not a tensor item (dtype {item.dtype!r})")
    whole = tuple(offsets) == (0,) * len(shape) and tuple(lengths) == shape
    if not _is_stored_frame(member, item.data_start) or math.prod(lengths) == 0:
        tensor = load_member(read, member, where=where)
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
            raise CorruptSnapshotError(f"{where}: member does not hold a tensor of shape {list(shape)}")
        return _narrow(tensor, offsets, lengths)
    size = dtype.itemsize
    if item.data_start + math.prod(shape) * size != member.raw_size:
        raise CorruptSnapshotError(f"{where}: the tensor's {list(shape)} {item.dtype} do not fill its member")
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    first = sum(o * s for o, s in zip(offsets, strides, strict=True))
    last = sum((o + n - 1) * s for o, n, s in zip(offsets, lengths, strides, strict=True))
    span = (last + 1 - first) * size
    direct = (
        out is not None
        and span == math.prod(lengths) * size
        and out.device.type == "cpu"
        and out.dtype == dtype
        and tuple(out.shape) == tuple(lengths)
        and out.is_contiguous()
    )
    target = out if direct and out is not None else torch.empty(span // size, dtype=dtype)
    view = target.reshape(-1).view(torch.uint8).numpy().data  # any dtype, bfloat16 too: its bytes
    try:
        _read_blocks(read, member, item.data_start, first * size, (last + 1) * size, view, whole=whole)
    except CorruptSnapshotError as exc:
        raise CorruptSnapshotError(f"{where}: {exc}") from None
    return target if direct else target.as_strided(tuple(lengths), tuple(strides))


def _narrow(tensor: torch.Tensor, offsets: tuple[int, ...], lengths: tuple[int, ...]) -> torch.Tensor:
    for dim, (o, n) in enumerate(zip(offsets, lengths, strict=True)):
        tensor = tensor.narrow(dim, o, n)
    return tensor


# -- DCP's Metadata as a tree ------------------------------------------------------------------------------------


def metadata_tree(metadata: Metadata, items: dict[MetadataIndex, Item]) -> dict[str, Any]:
    """``metadata`` as a tree of dicts, lists, strings and numbers (``planner_data`` as the planner made it),
    with ``items`` as its storage data."""
    tensors: dict[str, Any] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, BytesStorageMetadata):
            tensors[fqn] = {"kind": "bytes"}
            continue
        props = md.properties
        tensors[fqn] = {
            "kind": "tensor",
            "dtype": str(props.dtype).removeprefix("torch."),
            "requires_grad": props.requires_grad,
            "size": list(md.size),
            "chunks": [[list(c.offsets), list(c.sizes)] for c in md.chunks],
        }
    storage_meta = metadata.storage_meta
    return {
        "format": TREE_FORMAT,
        "version": metadata.version,
        "state_dict_metadata": tensors,
        "planner_data": metadata.planner_data,
        "storage_data": [
            [index.fqn, None if index.offset is None else list(index.offset), index.index, item.to_json()]
            for index, item in items.items()
        ],
        "storage_meta": None
        if storage_meta is None
        else {
            "checkpoint_id": None if storage_meta.checkpoint_id is None else str(storage_meta.checkpoint_id),
            "save_id": storage_meta.save_id,
            "load_id": storage_meta.load_id,
            "modules": list(storage_meta.modules),
        },
    }


def metadata_from_tree(tree: Any, members: Mapping[str, MemberInfo], own: str, where: str) -> Metadata:
    """The Metadata that :func:`metadata_tree` wrote, its storage data a dict of :class:`Item` located by the
    manifest's ``members`` (``own``: the path of the snapshot's own archive)."""
    if not isinstance(tree, dict) or tree.get("format") != TREE_FORMAT:
        raise CorruptSnapshotError(f"{where}: not DCP metadata written by bucketsnap.dcp ({TREE_FORMAT})")
    try:
        state: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
        for fqn, md in tree["state_dict_metadata"].items():
            if md["kind"] == "bytes":
                state[fqn] = BytesStorageMetadata()
                continue
            dtype = getattr(torch, md["dtype"])
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"{md['dtype']!r} is not a torch dtype")
            chunks = [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in md["chunks"]]
            props = TensorProperties(dtype=dtype, requires_grad=bool(md["requires_grad"]))
            state[fqn] = TensorStorageMetadata(props, torch.Size(md["size"]), chunks)
        storage = {
            MetadataIndex(fqn, None if offset is None else torch.Size(offset), index): Item.from_json(
                item, members, own
            )
            for fqn, offset, index, item in tree["storage_data"]
        }
        meta = tree.get("storage_meta")
        storage_meta = None if meta is None else StorageMeta(**meta)
        return Metadata(state, tree["planner_data"], storage, storage_meta, tree.get("version"))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CorruptSnapshotError(f"{where}: malformed DCP metadata ({type(exc).__name__}: {exc})") from exc


def encode_bytes_item(data: io.BytesIO | bytes) -> Any:
    """The value a DCP ``BYTE_IO`` item holds: DCP's planners ``torch.save`` it in this process, so loading it
    back runs no code from the bucket."""
    buffer = data if isinstance(data, io.BytesIO) else io.BytesIO(data)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)  # bytes made by this process's planner a moment ago
