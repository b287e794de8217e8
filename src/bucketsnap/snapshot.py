"""``Snapshot``: a lazy, read-only view of one committed snapshot."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

from bucketsnap.archive import load_member, verify_member
from bucketsnap.errors import CorruptSnapshotError, SnapshotNotFoundError
from bucketsnap.info import MemberInfo, SnapshotInfo
from bucketsnap.progress import ByteCounter, ProgressCallback
from bucketsnap.storage import Storage
from bucketsnap.values import MapLocation

__all__ = ["Snapshot"]

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
    ) -> None:
        self._storage = storage
        self.info = info
        self._map_location = map_location
        self._allow_pickle = allow_pickle

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
            allow_pickle=self._allow_pickle,
        )

    def __iter__(self) -> Iterator[str]:
        return iter(self.info.members)

    def __len__(self) -> int:
        return len(self.info.members)

    def load(self, keys: Iterable[str] | None = None, *, progress: ProgressCallback | None = None) -> dict[str, Any]:
        """The members ``keys`` (all if None) as a dict, in saved order.

        ``progress(done, total)`` is called with the stored bytes read so far (see :mod:`bucketsnap.progress`).
        """
        wanted = list(self.info.members) if keys is None else list(keys)
        members = [self._member(key) for key in wanted]
        if progress is None:
            return {key: self[key] for key in wanted}
        counter = ByteCounter(sum(m.stored_size for m in members), progress)
        return {key: self._load(key, counter.add) for key in wanted}

    def verify(self, *, progress: ProgressCallback | None = None) -> SnapshotInfo:
        """Re-read every member and check its CRC, zstd checksum and sizes; check the archive's size."""
        size = self._call_missing(lambda: self._storage.size(self.info.path))
        if size != self.info.size:
            raise CorruptSnapshotError(
                f"{self.info.url} is {size} bytes but {self.info.size} were committed (truncated or replaced)"
            )
        members = list(self.info.members.values())
        on_read = None if progress is None else ByteCounter(sum(m.stored_size for m in members), progress).add
        for member in members:
            verify_member(self._reader(member, on_read), member, where=f"{self.info.url} member {member.name}")
        for ref in self.info.refs:
            self._call_missing(lambda ref=ref: self._storage.size(ref))  # type: ignore[misc]
        return self.info

    def _member(self, key: str) -> MemberInfo:
        try:
            return self.info.members[key]
        except KeyError:
            raise KeyError(
                f"snapshot itr {self.info.itr} at {self.info.url} has no key {key!r}; it has {list(self.info.members)}"
            ) from None

    def _reader(self, member: MemberInfo, on_read: Callable[[int], None] | None = None) -> Callable[[int, int], bytes]:
        """Ranged reads of the object that holds ``member``, each size reported to ``on_read``."""
        path = member.path or self.info.path

        def read_range(start: int, end: int) -> bytes:
            data = self._call_missing(lambda: self._storage.read(path, start, end))
            if on_read is not None:
                on_read(len(data))
            return data

        return read_range

    def _call_missing(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except FileNotFoundError as exc:
            raise SnapshotNotFoundError(
                f"the archive of committed snapshot itr {self.info.itr} is missing: {self.info.url}. It was "
                "deleted by hand or by a concurrent delete; load another itr."
            ) from exc
