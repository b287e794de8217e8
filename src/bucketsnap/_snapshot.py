"""``Snapshot``: a lazy, read-only view of one committed snapshot.

Only indexing (and what is built on it: ``load``, ``values()``, ``items()``) reads a member; membership,
``keys()``, ``len()`` and iteration answer from the manifest entry alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, overload

from bucketsnap._archive import _member_stream, check_member, load_member, verify_member, verify_object
from bucketsnap._chunk_names import named_checksum
from bucketsnap._info import MemberInfo, SnapshotInfo
from bucketsnap._progress import ByteCounter, ProgressCallback
from bucketsnap._storage import Storage
from bucketsnap.errors import CorruptSnapshotError, SnapshotNotFoundError

if TYPE_CHECKING:
    from bucketsnap._tensors import MemberLayout
    from bucketsnap._values import MapLocation

__all__ = ["Snapshot"]

logger = logging.getLogger("bucketsnap")

T = TypeVar("T")


class Snapshot(Mapping[str, Any]):
    """One committed snapshot, read lazily: ``snap[key]`` downloads and decodes that member only.

    Attributes:
        info: the snapshot's :class:`SnapshotInfo`.
    """

    def __init__(
        self,
        storage: Storage,
        info: SnapshotInfo,
        *,
        map_location: MapLocation = None,
        allow_pickle: bool = False,
        max_member_size: int | None = None,
    ) -> None:
        self._storage = storage
        self._max_member_size = max_member_size
        self.info = info
        self._map_location = map_location
        self._allow_pickle = allow_pickle
        self._layouts: dict[str, MemberLayout] = {}

    def __repr__(self) -> str:
        return f"Snapshot(itr={self.info.itr}, url={self.info.url!r}, keys={list(self.info.members)})"

    def __getitem__(self, key: str) -> Any:
        return self._load(key)

    def _load(self, key: str, on_read: Callable[[int], None] | None = None) -> Any:
        member = self._member(key)
        return load_member(
            self._reader(member, on_read),
            member,
            where=f"{self.info.url} member {member.name}",
            map_location=self._map_location,
            max_member_size=self._max_member_size,
            allow_pickle=self._allow_pickle,
        )

    def __iter__(self) -> Iterator[str]:
        return iter(self.info.members)

    def __len__(self) -> int:
        return len(self.info.members)

    def __contains__(self, key: object) -> bool:
        # Mapping's would call __getitem__, downloading the member to answer.
        return key in self.info.members

    @overload
    def get(self, key: str, /) -> Any: ...
    @overload
    def get(self, key: str, /, default: T) -> Any | T: ...
    def get(self, key: str, /, default: Any = None) -> Any:
        """The member ``key``, loaded, or ``default`` (reading nothing) if the snapshot has no such key."""
        return self._load(key) if key in self.info.members else default

    def load(self, keys: Iterable[str] | None = None, *, progress: ProgressCallback | None = None) -> dict[str, Any]:
        """The members ``keys`` (all if None) as a dict, in saved order.

        ``progress(done, total)`` is called with the stored bytes read so far (see :mod:`bucketsnap._progress`).
        """
        wanted = list(self.info.members) if keys is None else list(keys)
        members = [self._member(key) for key in wanted]
        if progress is None:
            return {key: self[key] for key in wanted}
        counter = ByteCounter(sum(m.stored_size for m in members), progress)
        return {key: self._load(key, counter.add) for key in wanted}

    def tensor(self, member: str, key: str = "", rows: slice | None = None) -> Any:
        """One value of a member, or rows of it, read without the rest of the member.

        ``key`` is the value's path in the member: a state dict's key (``"actor.0.weight"``), with nested
        containers joined by ``"/"`` (``"state/0/exp_avg"``: dict keys, int keys as digits, list indices); ``""``
        is the member's value itself. The value is what ``snap[member]`` holds at that path: a tensor placed as
        ``map_location`` says (a ``Parameter`` where one was saved), a numpy array, or any other value.
        ``rows`` selects rows of a tensor or array (its first dimension) with a forward slice.

        Only the frames holding the value are downloaded and decompressed, each checked against its CRC-32,
        after one read of at most 64 KiB for the member's frame index and one of its header (both kept for
        later calls). A member of a snapshot saved before bucketsnap wrote seekable members is read whole
        (streamed; only the value is kept).

        Raises:
            KeyError: no member ``member``, or no value at ``key`` (the message lists some that exist).
            TypeError: ``rows`` given for a value that is not a tensor or array of at least one dimension.
            CorruptSnapshotError: a frame, the index or the header differs from what was written.
        """
        from bucketsnap import _frames, _tensors

        info = self._member(member)
        where = f"{self.info.url} member {info.name}"
        check_member(info, where, self._max_member_size)
        read_range = self._reader(info)
        options = {"map_location": self._map_location, "allow_pickle": self._allow_pickle}
        if info.codec != _frames.CODEC:
            with _member_stream(read_range, info, where, self._max_member_size) as stream:
                return _tensors.stream_value(stream, info, key, rows, where=where, **options)  # type: ignore[arg-type]
        layout = self._layouts.get(member)
        if layout is None:
            layout = self._layouts[member] = _tensors.read_layout(read_range, info, where=where)
        return _tensors.read_value(read_range, info, layout, key, rows, where=where, **options)  # type: ignore[arg-type]

    def verify(self, *, progress: ProgressCallback | None = None) -> SnapshotInfo:
        """Re-read the snapshot and check it against what was committed.

        Every object with a recorded checksum (``info.checksums``: the archives of snapshots committed by this
        version) is read whole, each byte once, and its CRC-32 checked; every member's CRC-32, zstd checksum
        and sizes are checked; the archive's size, and that every other object it needs exists. An entry
        committed before whole-archive checksums were recorded gets its members checked only, with a warning
        on the ``bucketsnap`` logger.

        Raises:
            CorruptSnapshotError: a byte differs from what was committed.
            SnapshotNotFoundError: an object the snapshot needs is missing (the message names it).
        """
        info = self.info
        size = self._call_missing(info.path, lambda: self._storage.size(info.path))
        if size != info.size:
            raise CorruptSnapshotError(
                f"{info.url} is {size} bytes but {info.size} were committed (truncated or replaced)"
            )
        held: dict[str, list[MemberInfo]] = {info.path: []}
        for member in info.members.values():
            held.setdefault(member.path or info.path, []).append(member)
        for ref in info.refs:
            held.setdefault(ref, [])
        recorded = {path: info.checksums.get(path) or named_checksum(path) or "" for path in held}
        whole = {path: checksum for path, checksum in recorded.items() if checksum.startswith("crc32:")}
        sizes = {path: size if path == info.path else self._size(path) for path in held}
        unchecked = [path for path in held if path not in whole and path not in info.refs]
        if unchecked:
            logger.warning(
                "snapshot itr %d at %s has no recorded checksum of %s (committed by an older bucketsnap, or "
                "recovered by repair): only its members' data can be checked there, not the archive's other bytes",
                info.itr, info.url, ", ".join(self._storage.url_of(p) for p in unchecked),
            )  # fmt: skip
        total = sum(sizes[p] if p in whole else sum(m.stored_size for m in ms) for p, ms in held.items())
        on_read = None if progress is None else ByteCounter(total, progress).add
        for path, members in held.items():
            where = self._storage.url_of(path)
            if path in whole:
                verify_object(
                    self._read_object(path, on_read),
                    sizes[path],
                    whole[path],
                    members,
                    where=where,
                    max_member_size=self._max_member_size,
                )
                continue
            for member in members:
                verify_member(
                    self._reader(member, on_read),
                    member,
                    where=f"{where} member {member.name}",
                    max_member_size=self._max_member_size,
                )
        return info

    def _member(self, key: str) -> MemberInfo:
        try:
            return self.info.members[key]
        except KeyError:
            raise KeyError(
                f"snapshot itr {self.info.itr} at {self.info.url} has no key {key!r}; it has {list(self.info.members)}"
            ) from None

    def _reader(self, member: MemberInfo, on_read: Callable[[int], None] | None = None) -> Callable[[int, int], bytes]:
        """Ranged reads of the object that holds ``member``, each size reported to ``on_read``."""
        return self._read_object(member.path or self.info.path, on_read)

    def _read_object(self, path: str, on_read: Callable[[int], None] | None) -> Callable[[int, int], bytes]:
        def read_range(start: int, end: int) -> bytes:
            data = self._call_missing(path, lambda: self._storage.read(path, start, end))
            if on_read is not None:
                on_read(len(data))
            return data

        def into(start: int, buffer: memoryview) -> int:  # the frame reader's reads into its reused buffers
            got = self._call_missing(path, lambda: self._storage.read_into(path, start, buffer))
            if on_read is not None:
                on_read(got)
            return got

        read_range.into = into  # type: ignore[attr-defined]
        return read_range

    def _size(self, path: str) -> int:
        return self._call_missing(path, lambda: self._storage.size(path))

    def _call_missing(self, path: str, fn: Callable[[], T]) -> T:
        """``fn()``, with a FileNotFoundError reported as SnapshotNotFoundError naming the object ``path``."""
        try:
            return fn()
        except FileNotFoundError as exc:
            if path == self.info.path:
                what = f"the archive of committed snapshot itr {self.info.itr} is missing: {self.info.url}"
            else:
                what = (
                    f"{self._storage.url_of(path)}, needed by committed snapshot itr {self.info.itr} "
                    f"({self.info.url}), is missing"
                )
            raise SnapshotNotFoundError(
                f"{what}. It was deleted by hand or by a concurrent delete; load another itr."
            ) from exc
