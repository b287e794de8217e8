"""repair() never brings back what was dropped or never committed, and never loses what is committed.

From docs/protocol.md ("Repair"): on a healthy run (its newest generation and every page it references
read) repair adds nothing and commits nothing, so a snapshot retention dropped and gc has not swept yet, the
archive of a save or overwrite killed before its commit, and an itr deleted since stay invisible; gc still
collects what retention dropped; saves in flight across a repair still land or fail their fence. Over a corrupt
generation repair rebuilds from the newest generation that reads plus the intact archives it does not list.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bucketsnap import KeepLast, SnapshotStore, StorageError
from bucketsnap._maintenance import DATA_DIRS, collect_garbage
from bucketsnap._manifest import generation_name
from bucketsnap._saving import prepare
from conftest import Backend

KILLED = str(Path(__file__).parent / "workers" / "killed_before_commit.py")


def visible(store: SnapshotStore, options: dict[str, Any] | None = None) -> dict[int, tuple[str, object]]:
    """What a fresh reader (its own page cache) sees: each itr's archive and the value it was saved with."""
    fresh = SnapshotStore(store.url, storage_options=options)
    return {i.itr: (i.path, i.metrics.get("v")) for i in fresh.infos()}


def stored(store: SnapshotStore) -> set[str]:
    return {f"{d}/{n}" for d in DATA_DIRS for n in store.storage.list(d) if not n.startswith(".")}


def corrupt_newest(store: SnapshotStore) -> None:
    """A newest generation that does not parse (a damaged object), above the one that was newest."""
    generation = store._log.generations()[-1] + 1
    store.storage.fs.pipe_file(store.storage.path(generation_name(generation)), b'{"format": "bucketsnap-manifest", "v')


def killed_save(backend: Backend, url: str, itr: int, value: int) -> str:
    """Run a real process that stores itr's archive (overwrite=True) and is SIGKILLed before its commit."""
    proc = subprocess.run(
        [sys.executable, KILLED, url, json.dumps(backend.options), str(itr), str(value)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == -9, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    lines = [line for line in proc.stdout.splitlines() if line.startswith("stored ")]
    assert len(lines) == 1, proc.stdout
    return lines[0].split()[1]


# -- retention's drops ------------------------------------------------------------------------------------


def test_repair_of_a_healthy_run_does_not_bring_back_what_retention_dropped(backend: Backend) -> None:
    policy = KeepLast(2)
    store = backend.store("retained", retention=policy)
    for itr in range(4):
        store.save(itr, {"v": itr}, metrics={"v": itr})
    before = visible(store, backend.options)
    assert sorted(before) == list(range(4 - policy.n, 4))
    generations = store._log.generations()
    dropped = stored(store) - store._log.read().referenced()
    assert dropped, "retention left the dropped archives to gc"
    repaired = SnapshotStore(store.url, storage_options=backend.options).repair()
    assert repaired.itrs() == sorted(before)
    assert visible(store, backend.options) == before
    assert store._log.generations() == generations, "repair of a healthy run commits nothing"
    # gc still collects what retention dropped: nothing leaks
    store.gc(min_age=0)
    assert stored(store) == store._log.read().referenced()
    assert visible(store, backend.options) == before


def test_repair_of_a_healthy_run_leaves_a_dropped_snapshot_to_gc_across_its_grace(local_backend: Backend) -> None:
    """gc's default min_age: the dropped archive is condemned, repaired over (nothing comes back), then swept."""
    store = local_backend.store(retention=KeepLast(1))
    store.save(1, {"v": 1}, metrics={"v": 1})
    dropped = store.info(1).path
    store.save(2, {"v": 2}, metrics={"v": 2})
    store.gc()  # condemns itr 1's archive
    assert dropped in store._log.read().condemned
    store.repair()
    assert store.itrs() == [2]
    assert dropped in collect_garbage(store._log, min_age=3600, dry_run=False, now=time.time() + 7200)
    assert stored(store) == store._log.read().referenced() and store.itrs() == [2]


# -- saves and overwrites killed before their commit -------------------------------------------------------


@pytest.mark.parametrize("name", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_repair_does_not_bring_back_the_archive_of_an_overwrite_killed_before_its_commit(
    name: str, request: pytest.FixtureRequest
) -> None:
    """A real writer process SIGKILLed between storing its archive and committing it (GCS and Azure take the same
    path in repair: it reads the log and lists nothing on a healthy run)."""
    process_backend: Backend = request.getfixturevalue(f"{name}_backend")
    url, options = process_backend.url("killed"), process_backend.options
    store = SnapshotStore(url, storage_options=options)
    store.save(1, {"v": 1}, metrics={"v": 1})
    store.save(2, {"v": 2}, metrics={"v": 2})
    orphan = killed_save(process_backend, url, 1, 99)  # an overwrite of itr 1, killed before its commit
    assert store.storage.exists(orphan)
    assert {itr: v for itr, (_, v) in visible(store, options).items()} == {1: 1, 2: 2}
    store.delete(1)  # the committed itr 1 is deleted; the killed overwrite's archive was never committed
    store.repair()
    assert {itr: v for itr, (_, v) in visible(store, options).items()} == {2: 2}, "the killed overwrite came back"
    # an overwrite of an itr still committed, killed too: the itr keeps its committed archive and value
    second = killed_save(process_backend, url, 2, 98)
    store.repair()
    assert {itr: v for itr, (_, v) in visible(store, options).items()} == {2: 2} and store.load(2)["v"] == 2
    store.gc(min_age=0)  # the orphans are collected
    assert not store.storage.exists(orphan) and not store.storage.exists(second)
    assert stored(store) == store._log.read().referenced()


def test_repair_does_not_commit_the_archive_of_a_new_save_killed_before_its_commit(local_backend: Backend) -> None:
    store = local_backend.store()
    store.save(1, {"v": 1}, metrics={"v": 1})
    orphan = killed_save(local_backend, store.url, 5, 5)
    assert store.storage.exists(orphan)
    assert store.repair().itrs() == [1]
    assert store.itrs() == [1]


@pytest.mark.parametrize("where", ["memory", "local"])
def test_repair_of_a_healthy_run_does_not_commit_an_archive_whose_commit_never_landed(
    where: str, request: pytest.FixtureRequest
) -> None:
    """The same in-process: a staged save (archive stored) whose writer stops before committing, on memory:// too."""
    backend: Backend = request.getfixturevalue(f"{where}_backend")
    store = backend.store()
    store.save(1, {"v": 1}, metrics={"v": 1})
    store._stage(prepare(1, {"v": 7}, {"v": 7}, overwrite=True, copy=False))  # an overwrite, never committed
    store._stage(prepare(3, {"v": 3}, {"v": 3}, overwrite=False, copy=False))  # a new save, never committed
    store.delete(1)
    assert store.repair().itrs() == []
    assert visible(store) == {}


# -- saves in flight across a repair -----------------------------------------------------------------------


def test_a_save_in_flight_across_a_repair_of_a_healthy_run_commits(memory_backend: Backend) -> None:
    store = memory_backend.store()
    store.save(1, {"v": 1}, metrics={"v": 1})
    staged = store._stage(prepare(2, {"v": 2}, {"v": 2}, overwrite=False, copy=False))
    store.repair()
    assert store.itrs() == [1], "repair did not commit the save in flight for it"
    store._commit_new(staged.info, staged.base, overwrite=False, written=[staged.info.path])
    assert visible(store) == {1: (store.info(1).path, 1), 2: (staged.info.path, 2)}
    store.verify(2)


def test_a_save_in_flight_whose_archive_gc_swept_fails_across_a_repair(memory_backend: Backend) -> None:
    store = memory_backend.store()
    store.save(1, {"v": 1}, metrics={"v": 1})
    staged = store._stage(prepare(2, {"v": 2}, {"v": 2}, overwrite=False, copy=False))
    assert staged.info.path in store.gc(min_age=0)
    store.repair()
    with pytest.raises(StorageError, match="gc deleted or may have deleted"):
        store._commit_new(staged.info, staged.base, overwrite=False, written=[staged.info.path])
    assert store.itrs() == [1]


def test_a_save_in_flight_across_a_repair_of_a_corrupt_generation_fails_its_fence(memory_backend: Backend) -> None:
    """Over a corrupt generation the lost sweeps are unknown: the repair numbers sweeps past them, so a save
    that read its base before fails rather than trust it."""
    store = memory_backend.store()
    store.save(1, {"v": 1}, metrics={"v": 1})
    staged = store._stage(prepare(2, {"v": 2}, {"v": 2}, overwrite=False, copy=False))
    corrupt_newest(store)
    repaired = store.repair()
    assert repaired.itrs() == [1, 2]  # its archive is intact and the base does not list it: recovered
    store.delete(2)
    with pytest.raises(StorageError, match="gc deleted or may have deleted"):
        store._commit_new(staged.info, staged.base, overwrite=False, written=[])
    assert store.itrs() == [1]


# -- over a corrupt generation -----------------------------------------------------------------------------


def test_repair_over_a_corrupt_generation_recovers_what_only_the_lost_generation_committed(
    local_backend: Backend,
) -> None:
    store = local_backend.store()
    store.save(1, {"v": 1}, metrics={"v": 1})
    store.save(2, {"v": 2}, metrics={"v": 2})
    committed = visible(store)
    newest = store._log.generations()[-1]
    store.storage.fs.pipe_file(
        store.storage.path(generation_name(newest)), b"{torn"
    )  # the generation that committed itr 2
    repaired = store.repair()
    assert repaired.itrs() == [1, 2] and visible(store) == committed
    store.verify(2)


def test_a_repair_that_finds_the_run_repaired_meanwhile_commits_nothing(
    memory_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bucketsnap import _maintenance as maintenance

    store = memory_backend.store()
    store.save(1, {"v": 1}, metrics={"v": 1})
    dropped = store.save(2, {"v": 2}, metrics={"v": 2})
    store._log.commit(lambda current: [s for s in current.snapshots if s.itr != 2])  # as retention drops it
    corrupt_newest(store)
    recover = maintenance._recover_info
    seen: list[list[int]] = []

    def then_another_repair(log: object, rel: str) -> object:
        info = recover(log, rel)  # type: ignore[arg-type]
        monkeypatch.setattr(maintenance, "_recover_info", recover)
        other = SnapshotStore(store.url)
        other.repair()  # another process repairs first (and brings itr 2 back, as over corruption it must) ...
        other.delete(2)  # ... and the user deletes it again
        seen.append(store._log.generations())
        return info

    monkeypatch.setattr(maintenance, "_recover_info", then_another_repair)
    assert store.repair().itrs() == [1]
    assert store._log.generations() == seen[0], "a repair over a run that reads now commits nothing"
    assert not store.storage.exists(dropped.path) and visible(store) == {1: (store.info(1).path, 1)}


@pytest.mark.parametrize("damage", ["generation", "page"])
def test_gc_refuses_a_run_whose_newest_generation_does_not_read(memory_backend: Backend, damage: str) -> None:
    """So that over a corrupt generation no gc that reads the run now runs beside repair."""
    from bucketsnap import CorruptSnapshotError
    from bucketsnap._pages import PAGE_DIR, TAIL

    store = memory_backend.store()
    for itr in range(TAIL + 2):
        store.save(itr, {"v": itr}, metrics={"v": itr})
    store.storage.fs.pipe_file(store.storage.path("snapshots/000000000099-00000000000000aa.zip"), b"an orphan")
    if damage == "generation":
        corrupt_newest(store)
    else:
        store.storage.delete(f"{PAGE_DIR}/{sorted(store.storage.list(PAGE_DIR))[0]}")
    objects = stored(store)
    with pytest.raises(CorruptSnapshotError, match="repair"):
        SnapshotStore(store.url).gc(min_age=0)
    assert stored(store) == objects
    SnapshotStore(store.url).repair()
    if damage == "generation":
        assert SnapshotStore(store.url).itrs() == list(range(TAIL + 2))


def test_repair_over_a_corrupt_generation_above_a_version_2_one_writes_version_3(tmp_path: Path) -> None:
    """tests/data/manifest-v2-run (see test_commit_log): a damaged generation 42 above its version 2 generation 41.
    Repair starts from 41, recovers nothing it lists, and commits version 3 (pages); on the healthy v2 run before
    the damage it committed nothing."""
    import shutil

    from bucketsnap._pages import TAIL

    run = tmp_path / "run"
    shutil.copytree(Path(__file__).parent / "data" / "manifest-v2-run", run)
    store = SnapshotStore(str(run))
    expected = [i for i in range(40) if i != 3]
    assert store.repair().generation == 41 and store._log.generations() == [41]
    corrupt_newest(store)
    repaired = store.repair()
    after = json.loads(store.storage.read(generation_name(repaired.generation)))
    assert after["version"] == 3 and after["count"] == 39 and after["pages"] and len(after["snapshots"]) < TAIL
    fresh = SnapshotStore(str(run))
    assert fresh.itrs() == expected and fresh.load(38)["step"] == 38


def test_a_run_whose_manifest_was_lost_is_rebuilt_from_its_archives(backend: Backend) -> None:
    """Issue 15: repair still rebuilds a run from its archives. With ``manifest/`` gone (deleted by hand, or
    ``snapshots/`` copied alone), ``repair(from_archives=True)`` brings every intact archive back, chunked buffers
    included; a plain repair leaves it, since a run whose first save is in flight looks the same."""
    import numpy as np

    from bucketsnap._chunks import ChunkedArrays

    store = backend.store("lost-manifest")
    rows = np.arange(4000, dtype=np.float32).reshape(1000, 4)
    for itr in (1, 2, 3):
        value = ChunkedArrays({"x": rows + itr}, 1000, kind="t", chunk_rows=256)
        store.save(itr, {"v": itr, "buffer": value}, metrics={"v": itr})
    before = visible(store, backend.options)
    store.storage.fs.rm(store.storage.path("manifest"), recursive=True)
    assert SnapshotStore(store.url, storage_options=backend.options).itrs() == []
    assert SnapshotStore(store.url, storage_options=backend.options).repair().itrs() == []  # a first save in flight?
    repaired = SnapshotStore(store.url, storage_options=backend.options).repair(from_archives=True)
    assert repaired.itrs() == [1, 2, 3] and visible(store, backend.options) == before
    fresh = SnapshotStore(store.url, storage_options=backend.options)
    assert fresh.load(2)["v"] == 2 and fresh.verify(3) is not None
