"""Snapshotter: garage's modes, gap, save_itr_params and load, on memory and S3 (and local disk where it matters)."""

from __future__ import annotations

import threading
from pathlib import Path

import fsspec
import pytest
import torch

from bucketsnap import (
    KeepEvery,
    KeepLast,
    NotAFileError,
    NotASnapshotError,
    SnapshotNotFoundError,
    Snapshotter,
    UnsafeLoadError,
)
from bucketsnap._manifest import Manifest
from conftest import Backend


@pytest.fixture(params=["memory", "s3"])
def mem_or_s3(request: pytest.FixtureRequest) -> Backend:
    if request.param == "s3":
        request.applymarker(pytest.mark.s3)
    return request.getfixturevalue(f"{request.param}_backend")  # type: ignore[no-any-return]


class Algo:
    """Stands for a garage algorithm object: no safe encoding, so it is cloudpickled."""

    def __init__(self, lr: float) -> None:
        self.lr = lr


def snapshotter(backend: Backend, mode: str, gap: int = 1) -> Snapshotter:
    return Snapshotter(backend.url(mode), mode, gap, storage_options=backend.options)


@pytest.mark.parametrize(
    ("mode", "gap", "kept"),
    [
        ("all", 1, [0, 1, 2, 3, 4, 5, 6, 7]),
        ("last", 1, [7]),
        ("gap", 3, [0, 3, 6]),  # itr 0 is a multiple of every gap
        ("gap", 1, [0, 1, 2, 3, 4, 5, 6, 7]),
        ("gap_and_last", 3, [0, 3, 6, 7]),
        ("gap_and_last", 4, [0, 4, 7]),
    ],
)
def test_modes_keep_what_garage_keeps(mem_or_s3: Backend, mode: str, gap: int, kept: list[int]) -> None:
    snap = snapshotter(mem_or_s3, mode, gap)
    saved = [snap.save_itr_params(itr, {"itr": itr}) is not None for itr in range(8)]
    assert snap.store.itrs() == kept
    if mode == "gap":
        assert saved == [itr % gap == 0 for itr in range(8)]
    assert snap.load(snap.snapshot_dir) == {"itr": kept[-1]}
    assert snap.load(snap.snapshot_dir, "first") == {"itr": kept[0]}


def test_mode_none_saves_nothing(mem_or_s3: Backend) -> None:
    snap = snapshotter(mem_or_s3, "none")
    assert snap.save_itr_params(0, {"itr": 0}) is None
    assert snap.save_itr_params(5, {"itr": 5}) is None
    assert snap.store.itrs() == []
    assert not fsspec.url_to_fs(snap.snapshot_dir, **mem_or_s3.options)[0].exists(snap.store.storage.root)
    with pytest.raises(FileNotFoundError, match="empty"):
        snap.load(snap.snapshot_dir)


def test_modes_are_retention_policies() -> None:
    assert Snapshotter("memory://m/a", "last").store.retention == KeepLast(1)
    assert Snapshotter("memory://m/b", "gap_and_last", 5).store.retention == KeepEvery(5) | KeepLast(1)
    assert Snapshotter("memory://m/c", "gap", 5).store.retention is None


def test_constructor_validates_and_exposes_properties() -> None:
    snap = Snapshotter("memory://m/run", snapshot_mode="gap", snapshot_gap=2)
    assert (snap.snapshot_dir, snap.snapshot_mode, snap.snapshot_gap) == ("memory://m/run", "gap", 2)
    assert Snapshotter("memory://m/default").snapshot_mode == "last"
    with pytest.raises(ValueError, match="snapshot_mode must be one of"):
        Snapshotter("memory://m/run", snapshot_mode="best")
    for gap in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="snapshot_gap"):
            Snapshotter("memory://m/run", "gap", gap)  # type: ignore[arg-type]


def test_save_itr_params_validates() -> None:
    snap = Snapshotter("memory://m/run", "all")
    for itr in (-1, 1.0, "3", True):
        with pytest.raises(ValueError, match="itr"):
            snap.save_itr_params(itr, {"x": 1})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="params must be a dict"):
        snap.save_itr_params(1, [1, 2])  # type: ignore[arg-type]


def test_load_itr_forms_and_errors(mem_or_s3: Backend) -> None:
    snap = snapshotter(mem_or_s3, "all")
    for itr in (2, 10, 3):
        snap.save_itr_params(itr, {"itr": itr})
    url = snap.snapshot_dir
    assert snap.load(url)["itr"] == 10
    assert snap.load(url, "first")["itr"] == 2
    assert snap.load(url, 3)["itr"] == 3
    assert snap.load(url, "3")["itr"] == 3  # garage accepts digit strings
    for bad in ("latest", "-1", -1, 1.5, True, None, "\uff13"):
        with pytest.raises(ValueError, match="'last' or 'first'"):
            snap.load(url, bad)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match=r"no snapshot with itr 4 .*committed itrs: 2, 3, 10") as missing:
        snap.load(url, 4)
    assert isinstance(missing.value, SnapshotNotFoundError)


def test_load_first_after_last_mode_pruned(mem_or_s3: Backend) -> None:
    snap = snapshotter(mem_or_s3, "last")
    for itr in range(4):
        snap.save_itr_params(itr, {"itr": itr})
    assert snap.load(snap.snapshot_dir, "first") == {"itr": 3}
    with pytest.raises(SnapshotNotFoundError, match="committed itrs: 3"):
        snap.load(snap.snapshot_dir, 0)


def test_saving_an_itr_again_replaces_it(mem_or_s3: Backend) -> None:
    snap = snapshotter(mem_or_s3, "all")
    snap.save_itr_params(1, {"v": "first"})
    snap.save_itr_params(1, {"v": "again"})
    assert snap.store.itrs() == [1]
    assert snap.load(snap.snapshot_dir, 1) == {"v": "again"}


def test_objects_are_pickled_only_with_consent(mem_or_s3: Backend) -> None:
    snap = snapshotter(mem_or_s3, "last")
    info = snap.save_itr_params(0, {"algo": Algo(0.1), "policy": {"w": torch.ones(3)}})
    assert info is not None and info.members["algo"].pickled and not info.members["policy"].pickled
    with pytest.raises(UnsafeLoadError, match="allow_pickle"):
        snap.load(snap.snapshot_dir)
    loaded = snap.load(snap.snapshot_dir, allow_pickle=True)
    assert loaded["algo"].lr == 0.1 and torch.equal(loaded["policy"]["w"], torch.ones(3))


def test_load_from_another_directory(mem_or_s3: Backend) -> None:
    writer = snapshotter(mem_or_s3, "all")
    writer.save_itr_params(7, {"itr": 7})
    reader = Snapshotter(mem_or_s3.url("other"), storage_options=mem_or_s3.options)
    assert reader.load(writer.snapshot_dir) == {"itr": 7}
    assert reader.store.itrs() == []


def test_not_a_file_error_for_a_file_or_a_foreign_directory(mem_or_s3: Backend) -> None:
    fs = fsspec.url_to_fs(mem_or_s3.base, **mem_or_s3.options)[0]
    snap = Snapshotter(mem_or_s3.url("mine"), storage_options=mem_or_s3.options)
    file_url = mem_or_s3.url("params.pkl")
    fs.pipe(file_url, b"garage's cloudpickle")
    with pytest.raises(NotAFileError, match="is a file, not a bucketsnap run") as err:
        snap.load(file_url)
    assert isinstance(err.value, NotASnapshotError) and not isinstance(err.value, FileNotFoundError)
    assert file_url.split("://")[-1] in str(err.value)
    foreign = mem_or_s3.url("garage-run")
    fs.pipe(f"{foreign}/itr_0.pkl", b"x")
    fs.pipe(f"{foreign}/progress.csv", b"x")
    with pytest.raises(NotAFileError, match=r"2 other object\(s\) \(itr_0.pkl, progress.csv\)"):
        snap.load(foreign, 0)
    with pytest.raises(SnapshotNotFoundError):
        snap.load(mem_or_s3.url("nothing-here"))


def test_not_a_file_error_on_local_disk(tmp_path: Path) -> None:
    snap = Snapshotter(str(tmp_path / "run"), "last")
    (tmp_path / "params.pkl").write_bytes(b"x")
    with pytest.raises(NotAFileError, match="is a file"):
        snap.load(str(tmp_path / "params.pkl"))
    with pytest.raises(NotAFileError, match="no bucketsnap manifest"):
        snap.load(str(tmp_path))
    snap.save_itr_params(0, {"itr": 0})
    (tmp_path / "run" / "notes.txt").write_text("a run may hold other files too")
    assert snap.load(str(tmp_path / "run")) == {"itr": 0}


def test_last_mode_commits_before_removing(monkeypatch: pytest.MonkeyPatch) -> None:
    snap = Snapshotter("memory://m/last-commits", "last")
    log = snap.store._log
    committed: list[Manifest] = []
    original = log.commit_state

    def recording(change, **kwargs):  # type: ignore[no-untyped-def]
        manifest = original(change, **kwargs)
        committed.append(manifest)
        return manifest

    monkeypatch.setattr(log, "commit_state", recording)
    for itr in range(5):
        snap.save_itr_params(itr, {"itr": itr})
    # save 0; then for each later itr: [prev, new] committed, then [new]
    assert [m.itrs() for m in committed] == [[0], [0, 1], [1], [1, 2], [2], [2, 3], [3], [3, 4], [4]]


@pytest.mark.parametrize("where", ["memory", "local"])
def test_last_mode_is_always_loadable_by_a_concurrent_reader(where: str, tmp_path: Path) -> None:
    url = "memory://m/concurrent" if where == "memory" else str(tmp_path / "run")
    snap = Snapshotter(url, "last")
    snap.save_itr_params(0, {"itr": 0, "w": torch.zeros(2000)})
    done = threading.Event()
    seen: list[int] = []
    errors: list[BaseException] = []

    def reader() -> None:
        loader = Snapshotter(url, "none")
        try:
            while True:  # at least one load, even if the writer is done first
                state = loader.load(url)
                assert torch.equal(state["w"], torch.full((2000,), float(state["itr"])))
                seen.append(state["itr"])
                if done.is_set():
                    break
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for itr in range(1, 40):
            snap.save_itr_params(itr, {"itr": itr, "w": torch.full((2000,), float(itr))})
    finally:
        done.set()
        thread.join()
    assert errors == []
    assert seen and seen == sorted(seen)  # never older than what it saw before
    assert snap.store.itrs() == [39]


def test_load_resolves_last_again_when_its_archive_vanishes(monkeypatch: pytest.MonkeyPatch) -> None:
    from bucketsnap._snapshot import Snapshot

    url = "memory://m/vanishing"
    snap = Snapshotter(url, "last")
    snap.save_itr_params(1, {"itr": 1})
    original = Snapshot.load
    calls: list[int] = []

    def racing_load(self: Snapshot, *args: object, **kwargs: object) -> object:
        calls.append(self.info.itr)
        if len(calls) == 1:  # between resolving "last" and reading it, a new save and a gc remove it
            snap.save_itr_params(2, {"itr": 2})
            snap.store.gc(min_age=0)
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Snapshot, "load", racing_load)
    assert snap.load(url) == {"itr": 2}
    assert calls == [1, 2]
    with pytest.raises(SnapshotNotFoundError, match="missing"):
        calls.clear()
        snap.save_itr_params(3, {"itr": 3})

        def vanish_for_int(self: Snapshot, *args: object, **kwargs: object) -> object:
            snap.save_itr_params(4, {"itr": 4})
            snap.store.gc(min_age=0)
            return original(self, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(Snapshot, "load", vanish_for_int)
        snap.load(url, 3)  # an explicit itr is not re-resolved
