"""The SnapshotStore contract, run on every backend: memory, local disk, S3 (LocalStack), GCS (fake-gcs-server)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from bucketsnap import (
    BucketsnapError,
    CorruptSnapshotError,
    SnapshotExistsError,
    SnapshotNotFoundError,
    SnapshotStore,
    StorageError,
    UnsafeLoadError,
)
from conftest import Backend
from helpers import assert_same, every_value_type


def test_every_value_type_round_trips_without_pickle(backend: Backend) -> None:
    store = backend.store()
    state = every_value_type()
    info = store.save(1, state, metrics={"return": 12.5, "tag": "ok", "step": torch.tensor(3)})
    assert not any(m.pickled for m in info.members.values())
    assert info.metrics == {"return": 12.5, "tag": "ok", "step": 3}
    assert_same(store.load(1), state)
    assert_same(store.load(1, allow_pickle=False)["policy"], state["policy"])


def test_restored_model_and_optimizer_load_into_fresh_objects(backend: Backend) -> None:
    store = backend.store()
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    store.save(5, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    restored = store.load()
    model2 = torch.nn.Linear(4, 2)
    opt2 = torch.optim.Adam(model2.parameters())
    model2.load_state_dict(restored["model"])
    opt2.load_state_dict(restored["optimizer"])
    assert torch.equal(model2.weight, model.weight)
    assert_same(opt2.state_dict(), opt.state_dict())


def test_last_first_and_itr_lookup(backend: Backend) -> None:
    store = backend.store()
    for itr in (3, 10, 7):
        store.save(itr, {"itr": itr})
    assert store.itrs() == [3, 7, 10]
    assert store.info("last").itr == 10
    assert store.info("first").itr == 3
    assert store.load(7) == {"itr": 7}
    assert store.load("last") == {"itr": 10}
    assert store.info().url.startswith(store.url)


def test_lookup_errors_are_typed_and_name_the_url(backend: Backend) -> None:
    store = backend.store()
    with pytest.raises(SnapshotNotFoundError, match="empty") as empty:
        store.load()
    assert store.url in str(empty.value)
    assert isinstance(empty.value, FileNotFoundError)
    store.save(1, {"x": 1})
    with pytest.raises(FileNotFoundError, match="itr 2"):
        store.info(2)
    for bad in ("latest", 1.0, True, None):
        with pytest.raises(ValueError, match="which must be"):
            store.info(bad)  # type: ignore[arg-type]


def test_saving_a_committed_itr_needs_overwrite(backend: Backend) -> None:
    store = backend.store()
    store.save(4, {"v": 1})
    with pytest.raises(SnapshotExistsError, match="overwrite=True") as exc:
        store.save(4, {"v": 2})
    assert isinstance(exc.value, FileExistsError)
    assert store.load(4) == {"v": 1}
    store.save(4, {"v": 3}, overwrite=True)
    assert store.load(4) == {"v": 3}
    assert store.itrs() == [4]
    assert len(store.storage.list("snapshots")) == 1, "the replaced archive is deleted"


def test_delete(backend: Backend) -> None:
    store = backend.store()
    store.save(1, {"v": 1})
    store.save(2, {"v": 2})
    store.delete(2)
    assert store.itrs() == [1]
    assert store.info("last").itr == 1
    with pytest.raises(SnapshotNotFoundError):
        store.delete(2)


def test_open_is_lazy_and_reports_members(backend: Backend) -> None:
    store = backend.store()
    store.save(1, {"policy": {"w": torch.ones(3)}, "optimizer": {"lr": 0.1}, "buffer": torch.zeros(1000, 10)})
    snap = store.open()
    assert list(snap.keys()) == ["policy", "optimizer", "buffer"]
    assert snap.info.members["buffer"].raw_size > 40_000 > snap.info.members["buffer"].stored_size
    assert torch.equal(snap["policy"]["w"], torch.ones(3))
    assert store.load(keys=["optimizer"]) == {"optimizer": {"lr": 0.1}}
    with pytest.raises(KeyError, match="has no key 'nope'"):
        snap["nope"]


def test_pickled_values_need_allow_pickle(backend: Backend) -> None:
    store = backend.store()
    schedule = lambda progress: 3e-4 * progress  # noqa: E731 -- SB3 stores schedules like this
    store.save(1, {"schedule": schedule, "policy": {"w": torch.ones(2)}})
    assert store.info().members["schedule"].pickled
    with pytest.raises(UnsafeLoadError, match="allow_pickle=True"):
        store.load()
    assert torch.equal(store.load(keys=["policy"])["policy"]["w"], torch.ones(2))
    assert store.load(allow_pickle=True)["schedule"](2.0) == pytest.approx(6e-4)


def test_verify_and_a_flipped_byte(backend: Backend) -> None:
    store = backend.store()
    store.save(1, {"keep": torch.arange(1000)})
    store.save(2, {"policy": torch.arange(100_000), "other": 1})
    assert store.verify(2).itr == 2
    info = store.info(2)
    data = bytearray(store.storage.read(info.path))
    data[info.members["policy"].offset + 100] ^= 0x40
    store.storage.fs.pipe_file(store.storage.path(info.path), bytes(data))
    with pytest.raises(CorruptSnapshotError, match=r"policy\.zst"):
        store.verify(2)
    with pytest.raises(CorruptSnapshotError):
        store.load(2, keys=["policy"])
    assert store.load(2, keys=["other"]) == {"other": 1}
    assert torch.equal(store.load(1)["keep"], torch.arange(1000))


@pytest.mark.parametrize("cut", [50, 0, -1], ids=["within-the-member", "at-its-start", "before-it"])
def test_truncated_archive(backend: Backend, cut: int) -> None:
    """Cut before a member's first byte, its reads start past the archive's end: S3 and GCS answer them with 416,
    which reported a StorageError (a store failure) instead of the archive truncated."""
    store = backend.store()
    store.save(1, {"keep": 1})
    info = store.save(2, {"policy": torch.arange(10_000)})
    data = store.storage.read(info.path)
    store.storage.fs.pipe_file(store.storage.path(info.path), data[: info.members["policy"].offset + cut])
    with pytest.raises(CorruptSnapshotError):
        store.verify(2)
    with pytest.raises(CorruptSnapshotError, match="truncated"):
        store.load(2)
    assert store.load(1) == {"keep": 1}


def test_garbage_manifest_is_reported_and_repair_recovers(backend: Backend) -> None:
    store = backend.store()
    for itr in (1, 2, 3):
        store.save(itr, {"v": itr})
    newest = store.storage.list("manifest")[-1]
    store.storage.fs.pipe_file(store.storage.path(f"manifest/{newest}"), b"{not json")
    with pytest.raises(CorruptSnapshotError, match="repair") as exc:
        store.load()
    assert store.url in str(exc.value)
    with pytest.raises(CorruptSnapshotError):
        store.save(4, {"v": 4})
    store.repair()
    assert store.itrs() == [1, 2, 3]
    assert [store.load(i)["v"] for i in (1, 2, 3)] == [1, 2, 3]
    store.save(4, {"v": 4})
    assert store.itrs() == [1, 2, 3, 4]


def test_gc_removes_orphans_and_never_committed_snapshots(backend: Backend) -> None:
    store = backend.store()
    store.save(1, {"v": 1})
    store.save(2, {"v": 2})
    orphan = "snapshots/000000000003-deadbeefdeadbeef.zip"
    store.storage.fs.pipe_file(store.storage.path(orphan), b"half an upload")
    assert store.gc(dry_run=True) == [], "a fresh object may be a concurrent writer's: left alone"
    assert store.gc(min_age=0, dry_run=True) == [orphan]
    assert store.storage.exists(orphan)
    assert store.gc(min_age=0) == [orphan]
    assert not store.storage.exists(orphan)
    assert store.itrs() == [1, 2]
    assert store.verify(1) and store.verify(2)


def test_bad_inputs_are_refused_before_writing(backend: Backend) -> None:
    store = backend.store()
    for itr in (-1, 1.5, "3", True):
        with pytest.raises(ValueError, match="itr"):
            store.save(itr, {"x": 1})  # type: ignore[arg-type]
    for state in ({}, [("x", 1)], {"../escape": 1}, {"a/b": 1}, {"": 1}, {".hidden": 1}, {3: 1}):
        with pytest.raises(ValueError):
            store.save(1, state)  # type: ignore[arg-type]
    for metrics in ({"r": float("nan")}, {"r": [1, 2]}, {1: 2}):
        with pytest.raises(ValueError, match="metric"):
            store.save(1, {"x": 1}, metrics=metrics)  # type: ignore[arg-type]
    assert store.itrs() == []
    assert store.storage.list("snapshots") == []


def test_map_location(memory_backend: Backend) -> None:
    store = memory_backend.store()
    store.save(1, {"w": torch.ones(2)})
    assert store.load(map_location="cpu")["w"].device.type == "cpu"
    assert store.load(map_location={"cpu": "cpu"})["w"].device.type == "cpu"
    seen = []
    out = store.load(map_location=lambda t, loc: seen.append(loc) or t.double())
    assert seen == ["cpu"] and out["w"].dtype == torch.float64
    assert store.load(map_location="meta")["w"].device.type == "meta"


def test_credentials_never_appear_in_errors() -> None:
    store = SnapshotStore("memory://AKIAEXAMPLE:hunter2@bucket/run")
    assert "hunter2" not in repr(store)
    with pytest.raises(BucketsnapError) as exc:
        store.load()
    assert "hunter2" not in str(exc.value)


@pytest.mark.parametrize(
    ("url", "meant"),
    [
        ("s3:/bucket/run", "s3://bucket/run"),
        ("gs:bucket/run", "gs://bucket/run"),
        ("memory:/bucket/run", "memory://bucket/run"),
        ("s3:/AKIAEXAMPLE:hunter2@bucket/run", "s3://***@bucket/run"),
        ("file:/tmp/run", "file:///tmp/run"),  # the absolute path meant, not file://tmp/run (found by review)
        ("simplecache::s3:/bucket/run", "s3://bucket/run"),  # in a chain
    ],
)
def test_a_scheme_without_its_two_slashes_is_refused_not_written_locally(
    url: str, meant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fsspec reads "s3:/bucket/run" as a local path: a save would write a folder "s3:" here, not the bucket."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="needs two slashes") as exc:
        SnapshotStore(url).save(1, {"x": 1})
    assert str(exc.value).endswith(f"did you mean {meant}?")
    assert "hunter2" not in str(exc.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("s3:://bucket/run", "s3: has one colon too many; did you mean s3://bucket/run?"),
        ("s3//bucket/run", "s3: needs a colon; did you mean s3://bucket/run?"),
        ("simplecache::gs//bucket/run", "gs: needs a colon; did you mean gs://bucket/run?"),
        ("s3://", "s3:// names no bucket: pass s3://<bucket>/<run path>"),
        ("gs:///run", "gs:// names no bucket"),
        ("az://", "az:// names no container"),
        ("simplecache::s3://", "s3:// names no bucket"),
        ("s3://AKIAEXAMPLE:hunter2@/run", "s3:// names no bucket"),
        ("file://", "file:// names no folder"),
    ],
)
def test_a_url_that_names_no_bucket_or_is_mistyped_is_refused_at_once(
    url: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by a session's probe: ``s3//bucket`` saved into a local folder ``s3``, ``file://`` into the working
    directory, ``s3:://bucket`` failed in aiobotocore with a TypeError, and ``gs://`` waited 60 s on DNS."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=re.escape(message)) as exc:  # before any request
        SnapshotStore(url).save(1, {"x": 1})
    assert "hunter2" not in str(exc.value)
    assert list(tmp_path.iterdir()) == []


def test_local_paths_with_a_colon_still_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for url in ("run:1", "./s3:/run", "local:run"):  # only bucketsnap's own schemes are refused
        SnapshotStore(url).save(1, {"x": 1})
        assert SnapshotStore(url).load()["x"] == 1


def test_a_secret_holding_a_slash_or_in_a_url_missing_one_never_appears_in_errors() -> None:
    """AWS secret keys may hold "/"; and a mistyped "s3:/key:secret@bucket" was shown whole (found by review)."""
    from bucketsnap.integrations.sb3 import load_sb3_zip

    with pytest.raises(BucketsnapError) as exc:
        SnapshotStore("memory://AKIAEXAMPLE:hun/ter2@bucket/run").load()
    assert "ter2" not in str(exc.value) and "***@bucket/run" in str(exc.value)
    with pytest.raises(BucketsnapError) as exc:
        load_sb3_zip("s3:/AKIAEXAMPLE:hun/ter2@bucket/model.zip")
    assert "ter2" not in str(exc.value) and "AKIAEXAMPLE" not in str(exc.value)
    with pytest.raises(BucketsnapError) as exc:  # s3fs takes "AKIAEXAMPLE:hunter" for the bucket, and says so
        load_sb3_zip("s3://AKIAEXAMPLE:hunter/2secret@bucket/model.zip")
    assert "hunter" not in str(exc.value) and "2secret" not in str(exc.value) and "AKIAEXAMPLE" not in str(exc.value)


def test_unwritable_location_is_a_storage_error_naming_the_url(tmp_path) -> None:  # type: ignore[no-untyped-def]
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    store = SnapshotStore(str(blocker / "run"))
    with pytest.raises(StorageError) as exc:
        store.save(1, {"x": 1})
    # The save's first operation, reading the manifest, finds a file where the run's parent directory should be.
    assert str(exc.value).startswith(f"storage operation on {blocker}/run/manifest failed: NotADirectoryError: ")
    assert isinstance(exc.value.__cause__, NotADirectoryError)
    assert blocker.read_text() == "not a directory"  # and nothing was written over it


def test_delete_whose_commit_response_was_lost_still_succeeds(memory_backend: Backend) -> None:
    store = memory_backend.store()
    store.save(1, {"v": 1})
    store.save(2, {"v": 2})
    real_create = store.storage.create_exclusive
    calls = []

    def create_then_lose_the_response(rel: str, data: bytes) -> None:
        calls.append(rel)
        real_create(rel, data)
        if len(calls) == 1:  # a transport retry re-sends the create and finds its own object
            raise FileExistsError(rel)

    store.storage.create_exclusive = create_then_lose_the_response  # type: ignore[method-assign]
    store.delete(2)
    assert store.itrs() == [1]
    assert len(calls) == 2


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # nothing written after the abort
def test_local_writeback_thread_commits_and_aborts_cleanly(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import threading

    from bucketsnap._backends import local as local_backend

    monkeypatch.setattr(local_backend, "WRITEBACK_EVERY", 2**20)  # start early writebacks after 1 MiB
    store = SnapshotStore(str(tmp_path / "run"))
    weights = torch.randn(2_000_000)  # 8 MiB: several writebacks
    store.save(1, {"w": weights})
    assert torch.equal(store.load(1)["w"], weights)
    store.verify(1)

    from bucketsnap._archive import ArchiveWriter

    real_add = ArchiveWriter.add_encoded

    def add_then_fail(self, key, encoded):  # type: ignore[no-untyped-def]
        if key == "bad":  # after 8 MiB of "w": the writeback thread is running
            raise RuntimeError("disk went away")
        return real_add(self, key, encoded)

    monkeypatch.setattr(ArchiveWriter, "add_encoded", add_then_fail)
    with pytest.raises(RuntimeError, match="disk went away"):
        store.save(2, {"w": weights, "bad": 1})
    assert store.itrs() == [1]
    leftovers = [p.name for p in (tmp_path / "run" / "snapshots").iterdir()]
    assert len(leftovers) == 1, f"the aborted archive's temp file is removed: {leftovers}"
    assert not [t for t in threading.enumerate() if t.name == "bucketsnap-writeback"]


def test_new_local_directories_are_fsynced_into_their_parents_before_the_first_commit(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import os

    root = tmp_path / "runs" / "run"  # neither "runs" nor "run" exists yet
    directories: dict[int, str] = {}  # open directory fds
    events: list[tuple[str, str]] = []
    real_open, real_close, real_fsync, real_link = os.open, os.close, os.fsync, os.link

    def recording_open(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
        fd = real_open(path, flags, *args, **kwargs)
        if os.path.isdir(path):
            directories[fd] = os.fspath(path)
        return fd

    def recording_close(fd):  # type: ignore[no-untyped-def]
        directories.pop(fd, None)
        return real_close(fd)

    def recording_fsync(fd):  # type: ignore[no-untyped-def]
        if fd in directories:
            events.append(("fsync", directories[fd]))
        return real_fsync(fd)

    def recording_link(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
        events.append(("link", os.fspath(dst)))
        return real_link(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "open", recording_open)
    monkeypatch.setattr(os, "close", recording_close)
    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "link", recording_link)
    store = SnapshotStore(str(root))
    store.save(1, {"v": 1})
    commit = events.index(("link", str(root / "manifest" / "000000000001.json")))
    before = {path for kind, path in events[:commit] if kind == "fsync"}
    # the root's parent's parent (where "runs" was made), the root's parent, the root (holding snapshots/ and
    # manifest/), and snapshots/ (holding the archive)
    assert {str(tmp_path), str(tmp_path / "runs"), str(root), str(root / "snapshots")} <= before
    assert ("fsync", str(root / "manifest")) in events[commit:]  # the generation itself

    events.clear()
    store.save(2, {"v": 2})  # once per directory: only the directories that gained an entry
    assert {path for kind, path in events if kind == "fsync"} == {str(root / "snapshots"), str(root / "manifest")}


def test_a_local_temp_archive_removed_before_its_rename_is_a_storage_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = SnapshotStore(str(tmp_path / "run"))
    store.save(1, {"v": 1})
    snapshots = tmp_path / "run" / "snapshots"

    def remove_temp_files(done: int, total: int) -> None:  # what a gc does to a save paused here
        for temp in snapshots.glob(".*.tmp-*"):
            temp.unlink()

    with pytest.raises(StorageError) as exc:
        store.save(2, {"w": torch.zeros(1000)}, progress=remove_temp_files)
    message = str(exc.value)
    assert str(snapshots) in message
    assert "vanished before it was moved into place (removed by gc or by hand while the save was paused)" in message
    assert "Nothing was committed; save again." in message
    assert store.itrs() == [1]
    store.save(2, {"w": torch.zeros(1000)})
    assert store.itrs() == [1, 2]


def test_a_local_temp_generation_removed_before_its_link_is_a_storage_error(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import os

    store = SnapshotStore(str(tmp_path / "run"))
    store.save(1, {"v": 1})
    real_link = os.link

    def remove_then_link(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
        if "manifest" in os.fspath(dst):
            os.unlink(src)  # a gc of the commit's temp file, while the commit was paused
        return real_link(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "link", remove_then_link)
    with pytest.raises(StorageError) as exc:
        store.save(2, {"v": 2})
    message = str(exc.value)
    assert str(tmp_path / "run" / "manifest" / "000000000002.json") in message
    assert "vanished before it was moved into place" in message and "Nothing was committed" in message
    monkeypatch.undo()
    assert store.itrs() == [1]
    assert [p.name for p in (tmp_path / "run" / "manifest").iterdir()] == ["000000000001.json"]
