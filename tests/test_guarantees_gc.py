"""gc and the fence, held by the sentences of docs/protocol.md and docs/security.md that each test names."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

import bucketsnap._commit as commit_module
from bucketsnap import CorruptSnapshotError, SnapshotStore, StorageError
from bucketsnap._manifest import generation_name


def _commit_edited(store: SnapshotStore, edit: Any) -> None:
    """Create the generation after the newest holding ``edit(doc)`` of the newest's JSON (another writer's)."""
    generation = store._log.generations()[-1]
    doc = json.loads(store.storage.read(generation_name(generation)))
    edit(doc)
    doc.update(generation=generation + 1, parent=doc.get("id"), id=uuid.uuid4().hex)
    store.storage.create_exclusive(generation_name(generation + 1), json.dumps(doc).encode())


@pytest.mark.parametrize("sweeps", [16, 17])
def test_a_save_that_spans_more_than_16_sweeps_fails_and_commits_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sweeps: int
) -> None:
    """protocol.md, Saving step 3: "those sweeps must still be recorded in N; otherwise the save fails with
    StorageError ... commits nothing"; Trade-offs: "A save that spans more than 16 sweeps (gc sweeps, deletes,
    overwrites) ... fails and must be repeated" (generations record the newest 16 sweeps)."""
    store = SnapshotStore(str(tmp_path / "run"))
    for itr in range(sweeps):
        store.save(itr, {"v": itr})
    original = commit_module.Committer.commit

    def late_commit(self: Any, info: Any, base: Any, **kwargs: Any) -> Any:
        for itr in range(sweeps):  # others delete meanwhile: each delete is one sweep
            SnapshotStore(store.url).delete(itr)
        return original(self, info, base, **kwargs)

    monkeypatch.setattr(commit_module.Committer, "commit", late_commit)
    if sweeps <= 16:  # every sweep since the save's base is still recorded: the fence can tell
        assert store.save(100, {"v": 100}).itr == 100
        assert store.itrs() == [100] and store.verify(100)
        return
    with pytest.raises(StorageError, match="gc deleted or may have deleted"):
        store.save(100, {"v": 100})
    assert store.itrs() == []
    assert store.storage.list("snapshots") == []  # refused for sure: its archive is deleted


def test_gc_never_sweeps_a_condemned_object_that_a_snapshot_needs(tmp_path: Path) -> None:
    """protocol.md, Cleaning up, step 2: the sweep takes "the objects condemned at least min_age seconds ago ...
    and still needed by no snapshot". A generation whose record condemns a needed archive (written by another
    writer that forgot to take it back) must not make gc delete it."""
    store = SnapshotStore(str(tmp_path / "run"))
    info = store.save(1, {"v": 1})
    _commit_edited(store, lambda doc: doc.setdefault("gc", {}).setdefault("condemned", {}).update({info.path: 0.0}))
    assert info.path in store._log.read().condemned
    assert info.path not in store.gc(min_age=0)
    assert (tmp_path / "run" / info.path).exists()
    assert store.verify(1) and store.load(1) == {"v": 1}


@pytest.mark.parametrize("where", ["condemned", "sweeps"])
def test_a_gc_record_naming_a_path_outside_the_run_is_refused(tmp_path: Path, where: str) -> None:
    """security.md: "manifest paths that leave the run" are validated (CorruptSnapshotError), so that
    bucketsnap's own tools inherit the checks; a gc record names objects gc deletes."""
    victim = tmp_path / "victim.zip"
    victim.write_bytes(b"not this run's")
    store = SnapshotStore(str(tmp_path / "run"))
    store.save(1, {"v": 1})
    outside = "../victim.zip"
    record = {"condemned": {outside: 0.0}} if where == "condemned" else {"sweep": 1, "sweeps": [
        {"epoch": 1, "deleting": [outside]}]}  # fmt: skip
    _commit_edited(store, lambda doc: doc.update(gc=record))
    with pytest.raises(CorruptSnapshotError):
        SnapshotStore(store.url).itrs()
    with pytest.raises(CorruptSnapshotError):
        SnapshotStore(store.url).gc(min_age=0)
    assert victim.read_bytes() == b"not this run's"


def test_a_save_whose_archive_is_deleted_before_its_commit_fails_with_the_fences_storage_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """gc(min_age=0) fails the saves in flight (SnapshotStore.gc), with a StorageError: an archive deleted between
    its upload and the save's check of its size escaped as a bare FileNotFoundError (the gc campaign on S3)."""
    store = SnapshotStore(f"memory://gc-guarantees/{uuid.uuid4().hex[:8]}")
    store.save(1, {"step": 1})
    size = store.storage.size

    def deleted_meanwhile(rel: str) -> int:
        if rel.startswith("snapshots/") and "000000000002" in rel:
            store.storage.delete(rel)  # as gc(min_age=0) in another process does
        return size(rel)

    monkeypatch.setattr(store.storage, "size", deleted_meanwhile)
    with pytest.raises(StorageError, match="gc deleted or may have deleted the archive this save had just written"):
        store.save(2, {"step": 2})
    monkeypatch.undo()
    assert store.itrs() == [1]
    assert store.load("last") == {"step": 1}
