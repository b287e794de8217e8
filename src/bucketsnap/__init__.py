"""bucketsnap: training-state snapshots in zstd zip archives at any fsspec URL, with an atomic commit log."""

from bucketsnap._version import __version__
from bucketsnap.distributed import DistributedSaveError, Sharded
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
from bucketsnap.preemption import PreemptionHandler, on_preemption
from bucketsnap.resume import Resumed, resume
from bucketsnap.retention import KeepAny, KeepBest, KeepEvery, KeepLast, RetentionPolicy
from bucketsnap.snapshot import Snapshot
from bucketsnap.snapshotter import Snapshotter
from bucketsnap.store import SnapshotStore
from bucketsnap.triggers import IntervalTrigger, PolicySaveTrigger

__all__ = [
    "BucketsnapError",
    "CommitConflictError",
    "CorruptSnapshotError",
    "DistributedSaveError",
    "IntervalTrigger",
    "KeepAny",
    "KeepBest",
    "KeepEvery",
    "KeepLast",
    "MemberInfo",
    "NotAFileError",
    "NotASnapshotError",
    "PolicySaveTrigger",
    "PreemptionHandler",
    "Resumed",
    "RetentionPolicy",
    "Sharded",
    "Snapshot",
    "SnapshotExistsError",
    "SnapshotInfo",
    "SnapshotNotFoundError",
    "SnapshotStore",
    "Snapshotter",
    "StorageError",
    "UnsafeLoadError",
    "__version__",
    "on_preemption",
    "resume",
]
