"""gc's grace period: nothing a reader or a concurrent writer may still be using is removed too early."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from bucketsnap import SnapshotStore
from bucketsnap.retention import KeepLast


def _age(path: Path, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


def test_grace_counts_from_when_a_snapshot_was_dropped_not_when_it_was_written(tmp_path: Path) -> None:
    store = SnapshotStore(str(tmp_path / "run"), retention=KeepLast(1))
    first = store.save(1, {"w": torch.ones(3)})
    archive = tmp_path / "run" / first.path
    _age(archive, 7200)  # written two hours ago ...
    store.save(2, {"w": torch.zeros(3)})  # ... and dropped by retention just now
    assert store.itrs() == [2]
    assert store.gc(min_age=3600) == [], "a reader that resolved itr 1 a moment ago may still be reading it"
    assert archive.exists()
    assert store.gc(min_age=0) == [first.path]
    assert not archive.exists()
    assert torch.equal(store.load()["w"], torch.zeros(3))


def test_an_old_orphan_that_no_generation_lists_is_removed(tmp_path: Path) -> None:
    store = SnapshotStore(str(tmp_path / "run"))
    store.save(1, {"v": 1})
    orphan = tmp_path / "run" / "snapshots" / "000000000002-0123456789abcdef.zip"
    orphan.write_bytes(b"a crashed upload")
    assert store.gc() == [], "young: may be a concurrent writer's, not yet committed"
    _age(orphan, 7200)
    assert store.gc() == ["snapshots/000000000002-0123456789abcdef.zip"]
    assert store.itrs() == [1] and store.verify(1)
