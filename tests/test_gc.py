"""gc's grace period: what a reader or a concurrent writer may still be using is removed only after it stayed
condemned for min_age (on gc's clock), and never in a way that a commit could reference (see test_gc_fencing)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from bucketsnap import SnapshotStore
from bucketsnap.retention import KeepLast


def _gc_clock(monkeypatch: pytest.MonkeyPatch, ahead: float) -> None:
    """gc's clock ``ahead`` seconds ahead of this process's (objects' mtimes play no part any more)."""
    real = time.time
    monkeypatch.setattr("bucketsnap.maintenance.time.time", lambda: real() + ahead)


def test_grace_counts_from_when_gc_condemned_an_object_not_when_it_was_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SnapshotStore(str(tmp_path / "run"), retention=KeepLast(1))
    first = store.save(1, {"w": torch.ones(3)})
    archive = tmp_path / "run" / first.path
    store.save(2, {"w": torch.zeros(3)})  # dropped by retention just now
    assert store.itrs() == [2]
    assert store.gc(min_age=3600) == [], "a reader that resolved itr 1 a moment ago may still be reading it"
    assert archive.exists()
    _gc_clock(monkeypatch, 1800)
    assert store.gc(min_age=3600) == [], "condemned half an hour ago"
    _gc_clock(monkeypatch, 3700)
    assert store.gc(min_age=3600) == [first.path]
    assert not archive.exists()
    assert torch.equal(store.load()["w"], torch.zeros(3))


def test_an_orphan_is_condemned_first_and_removed_by_a_later_gc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SnapshotStore(str(tmp_path / "run"))
    store.save(1, {"v": 1})
    orphan = tmp_path / "run" / "snapshots" / "000000000002-0123456789abcdef.zip"
    orphan.write_bytes(b"a crashed upload")
    assert store.gc(dry_run=True) == []
    assert store.gc() == [], "just condemned: may be a concurrent writer's, not yet committed"
    assert store.gc(dry_run=True) == []
    _gc_clock(monkeypatch, 7200)
    assert store.gc(dry_run=True) == ["snapshots/000000000002-0123456789abcdef.zip"]
    assert orphan.exists()
    assert store.gc() == ["snapshots/000000000002-0123456789abcdef.zip"]
    assert store.itrs() == [1] and store.verify(1)


def test_min_age_zero_removes_every_unreferenced_object_in_one_call(tmp_path: Path) -> None:
    store = SnapshotStore(str(tmp_path / "run"), retention=KeepLast(1))
    first = store.save(1, {"w": torch.ones(3)})
    store.save(2, {"w": torch.zeros(3)})
    assert store.gc(min_age=0, dry_run=True) == [first.path]
    assert store.gc(min_age=0) == [first.path]
    assert store.gc(min_age=0) == []
    assert store.itrs() == [2] and store.verify(2)


def test_a_commit_after_condemnation_takes_the_object_back(tmp_path: Path) -> None:
    """An object condemned while its save was running is needed again once that save commits."""
    store = SnapshotStore(str(tmp_path / "run"))
    store.save(1, {"v": 1})
    manifest = store._log.read()
    fake = "snapshots/000000000005-00000000000000aa.zip"
    store.storage.create_exclusive(fake, b"x")
    store.gc()
    assert fake in store._log.read().condemned
    # A later commit that references it (as the save that wrote it would) un-condemns it:
    from dataclasses import replace

    info = replace(store.info(1), itr=5, path=fake)
    committed = store._log.commit(lambda current: [*current.snapshots, info])
    assert fake not in committed.condemned and manifest.sweep == committed.sweep == 0
