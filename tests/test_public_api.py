"""The package root is a table of contents: complete, sorted, and free of optional dependencies."""

from __future__ import annotations

import subprocess
import sys

import bucketsnap


def test_all_is_sorted_and_complete() -> None:
    assert bucketsnap.__all__ == sorted(bucketsnap.__all__)
    public = {name for name in dir(bucketsnap) if not name.startswith("_")}
    modules = {name for name in public if type(getattr(bucketsnap, name)).__name__ == "module"}
    assert public - modules - set(bucketsnap.__all__) == set()
    for name in bucketsnap.__all__:
        assert getattr(bucketsnap, name) is not None


def test_import_needs_no_cloud_or_rl_framework() -> None:
    code = (
        "import sys, bucketsnap; "
        "bad = [m for m in ('s3fs', 'gcsfs', 'adlfs', 'azure', 'boto3', 'gymnasium', 'stable_baselines3', 'tianshou') "
        "if m in sys.modules]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_errors_inherit_the_matching_builtins() -> None:
    assert issubclass(bucketsnap.SnapshotNotFoundError, FileNotFoundError)
    assert issubclass(bucketsnap.CommitConflictError, FileExistsError)
    assert issubclass(bucketsnap.SnapshotExistsError, bucketsnap.CommitConflictError)
    assert issubclass(bucketsnap.StorageError, OSError)
    for name in ("UnreachableError", "CredentialsError", "BucketNotFoundError"):
        error = getattr(bucketsnap.errors, name)
        assert issubclass(error, bucketsnap.StorageError) and getattr(bucketsnap, name) is error
    from bucketsnap._storage import BucketNotFoundError

    assert BucketNotFoundError is bucketsnap.BucketNotFoundError  # the class the storage layer raises
    for name in bucketsnap.__all__:
        obj = getattr(bucketsnap, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, bucketsnap.BucketsnapError)


#: The API: the package root and these modules. Every other module is internal (its name starts with "_").
PUBLIC_SURFACE = {
    "bucketsnap.buffers": [
        "BufferKind",
        "BufferState",
        "Ring",
        "SavedBuffer",
        "TransitionStorage",
        "buffer_state",
        "register_buffer_kind",
        "restore_buffer",
    ],
    "bucketsnap.retention": ["KeepAny", "KeepBest", "KeepEvery", "KeepLast", "RetentionPolicy", "garage_mode", "split"],
    "bucketsnap.dcp": ["SnapshotReader", "SnapshotWriter"],
    "bucketsnap.distributed": [
        "LOCAL",
        "DistributedSaveError",
        "agree_on_preemption",
        "ProcessGroupArg",
        "Sharded",
        "load_rank",
        "shard_key",
        "shard_keys",
    ],
    "bucketsnap.persistence": [
        "PersistEvent",
        "Persistence",
        "PersistenceGroup",
        "PolicyPersistence",
        "RestoreEvent",
        "StateDictPersistence",
        "World",
    ],
    "bucketsnap.errors": [
        "BucketNotFoundError",
        "BucketsnapError",
        "CommitConflictError",
        "CorruptSnapshotError",
        "CredentialsError",
        "NotAFileError",
        "NotASnapshotError",
        "SnapshotExistsError",
        "SnapshotNotFoundError",
        "StorageError",
        "UnreachableError",
        "UnsafeLoadError",
    ],
    "bucketsnap.integrations.sb3": [
        "SB3Zip",
        "SnapshotCallback",
        "export_sb3_zip",
        "load_model",
        "load_sb3_zip",
        "load_vec_normalize",
        "save_model",
    ],
    "bucketsnap.integrations.lightning": ["BucketsnapCheckpointIO", "PATH_METRIC"],
    "bucketsnap.integrations.tianshou": ["RunExperiment", "keep_in_run"],
    "bucketsnap.testing": [
        "AfterCommits",
        "Attempt",
        "DuringSave",
        "Moment",
        "Preempted",
        "Run",
        "assert_same_state",
        "preempt",
        "run_training",
    ],
}
ROOT = [
    "BucketNotFoundError",
    "BucketsnapError",
    "CommitConflictError",
    "CorruptSnapshotError",
    "CredentialsError",
    "DistributedSaveError",
    "ExternalValue",
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
    "Retry",
    "SaveFuture",
    "Sharded",
    "Snapshot",
    "SnapshotExistsError",
    "SnapshotInfo",
    "SnapshotNotFoundError",
    "SnapshotStore",
    "Snapshotter",
    "StorageError",
    "UnreachableError",
    "UnsafeLoadError",
    "__version__",
    "on_preemption",
    "progress_bar",
    "resume",
]


def test_the_public_surface_is_pinned() -> None:
    """A change to what users can import is a deliberate edit of this list (and of docs/api.md)."""
    import importlib

    assert bucketsnap.__all__ == ROOT
    for name, expected in PUBLIC_SURFACE.items():
        module = importlib.import_module(name)
        assert list(module.__all__) == expected, name
        for attr in expected:
            assert hasattr(module, attr), f"{name}.{attr}"


def test_every_other_module_is_internal() -> None:
    from pathlib import Path

    src = Path(bucketsnap.__file__).parent
    public = {"bucketsnap", *PUBLIC_SURFACE, "bucketsnap.integrations"}
    for path in src.rglob("*.py"):
        parts = ["bucketsnap", *path.relative_to(src).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        name = ".".join(parts)
        assert name in public or any(p.startswith("_") for p in parts[1:]), f"{name} looks public: rename it _..."


def test_the_old_module_names_still_import_with_a_deprecation_warning() -> None:
    code = (
        "import warnings, importlib, bucketsnap\n"
        "for old, new in sorted(bucketsnap._RENAMED.items()):\n"
        "    with warnings.catch_warnings(record=True) as caught:\n"
        "        warnings.simplefilter('always')\n"
        "        module = importlib.import_module(old)\n"
        "    assert module is importlib.import_module(new), old\n"
        "    assert module.__spec__.name == new, (old, module.__spec__.name)\n"
        "    assert any(issubclass(w.category, DeprecationWarning) and old in str(w.message) for w in caught), old\n"
        "from bucketsnap.store import SnapshotStore\n"
        "assert SnapshotStore is bucketsnap.SnapshotStore\n"
        "print(len(bucketsnap._RENAMED))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(out) == 21


def test_snapshot_tensor_keeps_its_signature() -> None:
    """docs/api.md's `Snapshot.tensor(member, key="", rows=None)`; bucketsnap.dcp reads through it."""
    import inspect

    parameters = inspect.signature(bucketsnap.Snapshot.tensor).parameters
    assert [(p.name, p.default) for p in parameters.values()] == [
        ("self", inspect.Parameter.empty),
        ("member", inspect.Parameter.empty),
        ("key", ""),
        ("rows", None),
    ]
