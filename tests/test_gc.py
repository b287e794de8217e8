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
    monkeypatch.setattr("bucketsnap._maintenance.time.time", lambda: real() + ahead)


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


# -- regressions from the review of the fencing (each failed before its fix) ----------------------------------


def _orphan(tmp_path: Path, itr: int) -> tuple[SnapshotStore, str]:
    """A run with itr 1 committed and an intact, uncommitted archive of ``itr`` (a commit lost to corruption)."""
    store = SnapshotStore(str(tmp_path / "run"))
    store.save(1, {"v": 1})
    info = store.save(itr, {"v": itr})
    store._log.commit(lambda current: [s for s in current.snapshots if s.itr != itr])  # uncommit, keep the archive
    _corrupt_newest(store)  # ... and a newest generation that does not read: the commit of ``itr`` was lost in it
    return store, info.path


def _corrupt_newest(store: SnapshotStore) -> None:
    """A damaged newest generation above the one that was newest (repair only rebuilds over such a one)."""
    from bucketsnap._manifest import generation_name

    generation = store._log.generations()[-1] + 1
    store.storage.fs.pipe_file(store.storage.path(generation_name(generation)), b"{torn")


def test_repair_does_not_recover_an_archive_a_concurrent_gc_swept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bucketsnap import _maintenance as maintenance

    store, orphan = _orphan(tmp_path, 2)
    recover = maintenance._recover_info

    def then_gc(log: object, rel: str) -> object:
        info = recover(log, rel)  # type: ignore[arg-type]
        monkeypatch.setattr(maintenance, "_recover_info", recover)  # the other process's repair is a plain one
        other = SnapshotStore(store.url)  # another process, between verify and commit: repairs, drops it, gcs
        other.repair()
        other._log.commit(lambda current: [s for s in current.snapshots if s.itr != 2])
        assert other.gc(min_age=0) == [orphan]
        return info

    monkeypatch.setattr(maintenance, "_recover_info", then_gc)
    repaired = store.repair()
    assert repaired.itrs() == [1]
    for itr in store.itrs():
        store.verify(itr)


def test_repair_does_not_bring_back_what_a_delete_removes_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bucketsnap import _maintenance as maintenance

    store, second = _orphan(tmp_path, 2)
    recover = maintenance._recover_info

    def then_delete(log: object, rel: str) -> object:
        info = recover(log, rel)  # type: ignore[arg-type]
        monkeypatch.setattr(maintenance, "_recover_info", recover)  # the other process's repair is a plain one
        SnapshotStore(store.url).repair()  # recovered and committed by another repair ...
        SnapshotStore(store.url).delete(2)  # ... and deleted by another process before this repair commits
        return info

    monkeypatch.setattr(maintenance, "_recover_info", then_delete)
    assert store.repair().itrs() == [1]
    assert not (tmp_path / "run" / second).exists()
    store.verify(1)


def test_a_delete_is_recorded_as_a_sweep_so_a_late_recommit_of_its_snapshot_is_refused(tmp_path: Path) -> None:
    """A commit that landed and was then deleted by another process must not be put back by a retry."""
    from bucketsnap import StorageError

    store = SnapshotStore(str(tmp_path / "run"))
    staged = store._stage(__import__("bucketsnap._saving", fromlist=["prepare"]).prepare(
        5, {"v": 5}, None, overwrite=False, copy=False))  # fmt: skip
    store._commit_new(staged.info, staged.base, overwrite=False, written=[staged.info.path])
    store.delete(5)
    assert staged.info.path in store._log.read().sweeps[-1].deleting
    with pytest.raises(StorageError, match="gc deleted or may have deleted"):  # the retry of a lost response
        store._commit_new(staged.info, staged.base, overwrite=False, written=[])
    assert store.itrs() == []


def test_a_repaired_snapshot_records_the_checksum_of_its_whole_archive(tmp_path: Path) -> None:
    from bucketsnap import CorruptSnapshotError

    store, orphan = _orphan(tmp_path, 2)
    repaired = store.repair()
    assert repaired.find(2) is not None and orphan in repaired.find(2).checksums  # type: ignore[union-attr]
    store.verify(2)
    path = tmp_path / "run" / orphan
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # in the central directory: outside every member's data
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptSnapshotError, match="checksum mismatch"):
        store.verify(2)


def test_repair_over_corrupt_generations_numbers_sweeps_past_any_that_were_lost(tmp_path: Path) -> None:
    store = SnapshotStore(str(tmp_path / "run"))
    store.save(1, {"v": 1})
    for generation in store._log.generations():
        (tmp_path / "run" / "manifest" / f"{generation:012d}.json").write_bytes(b"{torn")
    newest = store._log.generations()[-1]
    repaired = store.repair()
    assert repaired.sweep > newest  # no sweep number ever used before: a save in flight fails its fence
    assert repaired.itrs() == [1] and store.verify(1)


def test_gc_forgets_a_condemned_name_that_is_no_longer_stored(tmp_path: Path) -> None:
    store = SnapshotStore(str(tmp_path / "run"))
    store.save(1, {"v": 1})
    temp = tmp_path / "run" / "snapshots" / ".000000000002-00000000000000aa.zip.tmp-0"
    temp.write_bytes(b"a save in flight")
    store.gc()
    assert "snapshots/.000000000002-00000000000000aa.zip.tmp-0" in store._log.read().condemned
    temp.unlink()  # the save renamed it
    assert store.gc(min_age=0) == []
    assert store._log.read().condemned == {} and store._log.read().sweep == 0


def test_gc_leaves_a_young_exclusive_create_probe_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deleting a probe between its two creates would make another process take the store for one that
    ignores If-None-Match; a probe left by a crash goes once it is an hour old."""
    from bucketsnap._storage import PROBE_PREFIX

    store = SnapshotStore(str(tmp_path / "run"))
    store.save(1, {"v": 1})
    probes = [f"manifest/{PROBE_PREFIX}0a", f"snapshots/{PROBE_PREFIX}0b"]
    for rel in probes:
        (tmp_path / "run" / rel).write_bytes(b"probe")
    assert store.gc(min_age=0) == []
    _gc_clock(monkeypatch, 3700)
    assert sorted(store.gc(min_age=0)) == sorted(probes)


def test_a_probe_deleted_between_the_listing_and_its_age_check_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the long gc campaign on S3: the probe deleted itself after gc listed it, and gc raised."""
    from bucketsnap._storage import PROBE_PREFIX

    store = SnapshotStore(str(tmp_path / "run"))
    store.save(1, {"v": 1})
    (tmp_path / "run" / "snapshots" / f"{PROBE_PREFIX}0c").write_bytes(b"probe")
    real = store.storage.modified

    def deleted_meanwhile(rel: str) -> float | None:
        if PROBE_PREFIX in rel:
            raise FileNotFoundError(rel)
        return real(rel)

    monkeypatch.setattr(store.storage, "modified", deleted_meanwhile)
    assert store.gc(min_age=0) == []


@pytest.mark.parametrize("directory", ["manifest", "manifest/pages"])
def test_a_commits_temp_file_gone_between_the_listing_and_its_age_check_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, directory: str
) -> None:
    """Found by review (1 gc in 123 beside a writer): a local commit linked its temp file into place and removed
    it after gc listed it, and gc raised a raw FileNotFoundError."""
    store = SnapshotStore(str(tmp_path / "run"))
    store.save(1, {"v": 1})
    temp = tmp_path / "run" / directory / "000000000002.json.tmp-0c"
    temp.parent.mkdir(parents=True, exist_ok=True)
    temp.write_bytes(b"{}")
    real = store.storage.modified

    def linked_and_removed_meanwhile(rel: str) -> float | None:
        if ".tmp-" in rel:
            temp.unlink(missing_ok=True)
        return real(rel)

    monkeypatch.setattr(store.storage, "modified", linked_and_removed_meanwhile)
    assert store.gc(min_age=0) == []
    assert store.load()["v"] == 1
