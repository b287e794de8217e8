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
        "bad = [m for m in ('s3fs', 'gcsfs', 'boto3', 'gymnasium', 'stable_baselines3', 'tianshou') "
        "if m in sys.modules]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_errors_inherit_the_matching_builtins() -> None:
    assert issubclass(bucketsnap.SnapshotNotFoundError, FileNotFoundError)
    assert issubclass(bucketsnap.CommitConflictError, FileExistsError)
    assert issubclass(bucketsnap.SnapshotExistsError, bucketsnap.CommitConflictError)
    assert issubclass(bucketsnap.StorageError, OSError)
    for name in bucketsnap.__all__:
        obj = getattr(bucketsnap, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, bucketsnap.BucketsnapError)
