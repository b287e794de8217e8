"""bucketsnap: training-state snapshots in zstd zip archives at any fsspec URL, with an atomic commit log."""

from bucketsnap._version import __version__
from bucketsnap.errors import (
    BucketsnapError,
    CommitConflictError,
    CorruptSnapshotError,
    NotAFileError,
    NotASnapshotError,
    SnapshotExistsError,
    SnapshotNotFoundError,
    StorageError,
    UnsafeLoadError,
)
from bucketsnap.info import MemberInfo, SnapshotInfo
from bucketsnap.resume import Resumed, resume
from bucketsnap.snapshot import Snapshot
from bucketsnap.store import SnapshotStore

__all__ = [
    "BucketsnapError",
    "CommitConflictError",
    "CorruptSnapshotError",
    "MemberInfo",
    "NotAFileError",
    "NotASnapshotError",
    "Resumed",
    "Snapshot",
    "SnapshotExistsError",
    "SnapshotInfo",
    "SnapshotNotFoundError",
    "SnapshotStore",
    "StorageError",
    "UnsafeLoadError",
    "__version__",
    "resume",
]
