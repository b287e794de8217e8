"""Reading one value (one tensor, or rows of it) of a member without the rest of the member.

A member's payload header is its tree (:mod:`bucketsnap._values`), whose buffers follow in the order a
depth-first walk meets them: walking the tree once gives each value's byte range in the payload, with no
offsets stored. A value is addressed by its path in the tree: dict keys (``str()`` of int keys) and list or
tuple indices, joined by ``"/"`` (``"actor.0.weight"``, ``"state/0/exp_avg"``).

In a seekable member (codec ``"zstd-frames"``, :mod:`bucketsnap._frames`) that range is read from the frames
that hold it, and the frame index and header are read once per member and kept (:class:`MemberLayout`). A
member written before seekable members (codec ``"zstd"``, one frame) is streamed from its start: the value is
decoded where it lies and the rest is read to check the member's checksum, so the whole member is downloaded
but only the value is kept in memory.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, BinaryIO

from bucketsnap import _frame_reader, _frames
from bucketsnap._info import MemberInfo
from bucketsnap._values import _LEN, MAGIC, MAX_HEADER_SIZE, Decoder, MapLocation, _read_exact
from bucketsnap._zipformat import READ_CHUNK, ReadRange
from bucketsnap.errors import BucketsnapError, CorruptSnapshotError

__all__ = ["MemberLayout", "ValueLocation", "read_layout", "read_value", "stream_value"]

_PREFIX = len(MAGIC) + _LEN.size


@dataclass(frozen=True)
class ValueLocation:
    """Where one value's bytes are in its member's payload: ``[start, end)``, from the payload's start."""

    node: Any
    start: int
    end: int

    @property
    def kind(self) -> str | None:
        """``"$tensor"``, ``"$ndarray"``, another tag, or None for a plain JSON value or list."""
        return next(iter(self.node)) if isinstance(self.node, dict) else None


@dataclass(frozen=True)
class MemberLayout:
    """A seekable member's frame index and the location of every value in its tree."""

    index: _frames.FrameIndex
    values: dict[str, ValueLocation]


def locate(tree: Any, data_start: int, where: str) -> dict[str, ValueLocation]:
    """Every addressable value of ``tree`` by path (``""``: the member's value itself)."""
    out: dict[str, ValueLocation] = {}

    def walk(node: Any, path: str | None, pos: int) -> int:
        start = pos
        if isinstance(node, list):
            for i, child in enumerate(node):
                pos = walk(child, _join(path, str(i)), pos)
        elif isinstance(node, dict):
            tag = next(iter(node), None)
            body: Any = node.get(tag) if tag is not None else None
            if tag in ("$dict", "$odict"):
                for pair in body:
                    key, child = pair
                    pos = walk(key, None, pos)  # a key's own buffers (a tensor key): not addressable
                    name = str(key) if key is None or isinstance(key, (bool, int, float, str)) else None
                    pos = walk(child, _join(path, name) if name is not None else None, pos)
                if "metadata" in node:
                    pos = walk(node["metadata"], None, pos)
            elif tag == "$tuple":
                for i, child in enumerate(body):
                    pos = walk(child, _join(path, str(i)), pos)
            elif tag in ("$tensor", "$ndarray", "$pickle"):
                pos += int(body["nbytes"])
            elif tag == "$bytes":
                pos += int(body)
            elif tag != "$float":
                raise CorruptSnapshotError(f"{where}: unknown node type {sorted(node)}")
        if path is not None:
            out.setdefault(path, ValueLocation(node, start, pos))
        return pos

    try:
        walk(tree, "", data_start)
    except (KeyError, TypeError, ValueError, StopIteration, RecursionError) as exc:
        raise CorruptSnapshotError(f"{where}: malformed value header: {type(exc).__name__}: {exc}") from exc
    return out


def _join(path: str | None, name: str) -> str | None:
    if path is None:
        return None
    return f"{path}/{name}" if path else name


def _parse_header(data: bytes, where: str) -> tuple[Any, int]:
    """The tree of a payload whose first bytes are ``data`` (its prefix and whole header), and its data start."""
    try:
        header = json.loads(data[_PREFIX:])
        return header["tree"], len(data)
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise CorruptSnapshotError(f"{where}: malformed value header: {type(exc).__name__}: {exc}") from exc


def _header_length(prefix: bytes, member: MemberInfo, where: str) -> int:
    if prefix[: len(MAGIC)] != MAGIC:
        raise CorruptSnapshotError(f"{where}: not a bucketsnap value (bad magic {prefix[:8]!r})")
    (length,) = _LEN.unpack(prefix[len(MAGIC) : _PREFIX])
    if length > min(MAX_HEADER_SIZE, member.raw_size - _PREFIX):
        raise CorruptSnapshotError(f"{where}: header of {length} bytes exceeds the member or the limit")
    return int(length)


def read_layout(read_range: ReadRange, member: MemberInfo, *, where: str) -> MemberLayout:
    """A seekable member's index (one ranged read of its last 64 KiB) and header (its first frame)."""
    index = _frames.read_index(read_range, member.offset, member.stored_size, member.raw_size, where=where)
    crc = _frames.member_crc(index)  # the index against the member's CRC-32, as a whole read checks it
    if f"{crc:08x}" != member.crc32:
        raise CorruptSnapshotError(
            f"{where}: checksum mismatch (crc32 {crc:08x} of the frame index, expected {member.crc32})"
        )
    tail_start, tail = index.tail
    tail_start += member.offset

    def read_range_cached(start: int, end: int) -> bytes:  # a small member's header was in the index's read
        if start >= tail_start and end <= tail_start + len(tail):
            return tail[start - tail_start : end - tail_start]
        return read_range(start, end)

    if member.raw_size < _PREFIX:
        raise CorruptSnapshotError(f"{where}: member of {member.raw_size} bytes is too small to hold a value")
    first = _frame_reader.read_payload(
        read_range_cached, member.offset, index, 0, max(_PREFIX, min(index.raw_sizes[0], member.raw_size)), where=where
    )
    end = _PREFIX + _header_length(first, member, where)
    if len(first) < end:
        first += _frame_reader.read_payload(read_range_cached, member.offset, index, len(first), end, where=where)
    tree, data_start = _parse_header(first[:end], where)
    return MemberLayout(dataclasses.replace(index, tail=(0, b"")), locate(tree, data_start, where))


def find(values: dict[str, ValueLocation], path: str, where: str) -> ValueLocation:
    try:
        return values[path]
    except KeyError:
        shown = [p for p in values if p][:8]
        more = f", ... ({len(values) - 1} in all)" if len(values) > 9 else ""
        raise KeyError(f"{where} has no value at {path!r}; it has {', '.join(map(repr, shown))}{more}") from None


def select_rows(loc: ValueLocation, rows: slice | None, where: str) -> tuple[Any, int, int, int]:
    """The node, byte range and step of rows ``rows`` of the value at ``loc`` (all of it when None)."""
    if rows is None:
        return loc.node, loc.start, loc.end, 1
    if loc.kind not in ("$tensor", "$ndarray"):
        raise TypeError(f"{where}: rows= selects rows of a tensor or array, not of {loc.kind or 'a plain value'}")
    spec = loc.node[loc.kind]
    try:
        shape = [int(d) for d in spec["shape"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptSnapshotError(f"{where}: malformed shape in the value's header: {exc}") from exc
    if not shape or spec.get("scalar"):
        raise TypeError(f"{where}: rows= needs a tensor or array with at least one dimension, not a scalar")
    start, stop, step = rows.indices(shape[0])
    if step < 1:
        raise ValueError(f"{where}: rows= takes a forward slice (step >= 1), not step {step}")
    count = max(0, (stop - start + step - 1) // step)
    row_bytes = (loc.end - loc.start) // shape[0] if shape[0] else 0
    span = (count - 1) * step + 1 if count else 0
    first = loc.start + start * row_bytes
    node = {loc.kind: {**spec, "shape": [span, *shape[1:]], "nbytes": span * row_bytes}}
    return node, first, first + span * row_bytes, step


def _decode(
    stream: BinaryIO, node: Any, step: int, nbytes: int, *, where: str, map_location: MapLocation, allow_pickle: bool
) -> Any:
    decoder = Decoder(stream, map_location if step == 1 else "cpu", allow_pickle, where, nbytes)
    try:
        value = decoder.node(node)
    except BucketsnapError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
        raise CorruptSnapshotError(f"{where}: malformed value: {type(exc).__name__}: {exc}") from exc
    if step == 1:
        return value
    value = value[::step]
    if "$tensor" in node:
        import torch

        value = decoder.place(value.contiguous(), str(node["$tensor"].get("device", "cpu")))
        if node["$tensor"].get("param"):
            return torch.nn.Parameter(value, requires_grad=bool(node["$tensor"].get("requires_grad", True)))
        return value
    return value.copy()


def read_value(
    read_range: ReadRange,
    member: MemberInfo,
    layout: MemberLayout,
    path: str,
    rows: slice | None,
    *,
    where: str,
    map_location: MapLocation = None,
    allow_pickle: bool = False,
) -> Any:
    """The value at ``path`` of a seekable member (rows ``rows`` of it), reading only the frames that hold it."""
    node, start, end, step = select_rows(find(layout.values, path, where), rows, where)
    with _frame_reader.FramesReader(read_range, member.offset, layout.index, start, end, where=where) as stream:
        return _decode(
            stream,  # type: ignore[arg-type]
            node,
            step,
            end - start,
            where=where,
            map_location=map_location,
            allow_pickle=allow_pickle,
        )


def stream_value(
    stream: BinaryIO,
    member: MemberInfo,
    path: str,
    rows: slice | None,
    *,
    where: str,
    map_location: MapLocation = None,
    allow_pickle: bool = False,
) -> Any:
    """The value at ``path`` from a member's whole payload ``stream`` (one read forward, the rest skipped)."""
    prefix = _read_exact(stream, _PREFIX, where)
    header = _read_exact(stream, _header_length(prefix, member, where), where)
    tree, data_start = _parse_header(prefix + header, where)
    node, start, end, step = select_rows(find(locate(tree, data_start, where), path, where), rows, where)
    _skip(stream, start - data_start, where)
    value = _decode(stream, node, step, end - start, where=where, map_location=map_location, allow_pickle=allow_pickle)
    _skip(stream, member.raw_size - end, where)
    return value


def _skip(stream: BinaryIO, n: int, where: str) -> None:
    buffer = memoryview(bytearray(min(n, READ_CHUNK) or 1))
    while n > 0:
        got = stream.readinto(buffer[: min(n, len(buffer))])  # type: ignore[attr-defined]
        if not got:
            raise CorruptSnapshotError(f"{where}: truncated payload")
        n -= got
