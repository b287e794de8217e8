"""GCS parallel composite uploads, against fake-gcs-server: parts uploaded at once, composed, cleaned up."""

from __future__ import annotations

import threading
import time
from typing import Any

import fsspec
import pytest
import torch

from bucketsnap import SnapshotStore, StorageError
from bucketsnap._backends.gcs import GcsComposeWriter
from bucketsnap._uploads import PartUploader
from conftest import Backend

KiB = 1024


def _archives(store: SnapshotStore, backend: Backend) -> list[str]:
    """Every object under the run's ``snapshots/``, as a fresh client lists it."""
    fs, root = fsspec.core.url_to_fs(store.url, **backend.options)
    fs.invalidate_cache()
    return sorted(p.removeprefix(root + "/") for p in fs.find(f"{root}/snapshots"))


def test_a_large_archive_is_composed_from_parts_and_they_are_removed(gcs_backend: Backend) -> None:
    store = gcs_backend.store(part_size=256 * KiB, upload_concurrency=4)
    state = {"policy": {"w": torch.randn(1_000_000)}}  # 4 MB: 16 parts, one compose
    info = store.save(1, state)
    assert torch.equal(store.load(1)["policy"]["w"], state["policy"]["w"])
    store.verify(1)
    assert _archives(store, gcs_backend) == [info.path]


def test_more_parts_than_one_compose_takes_are_composed_as_a_tree(gcs_backend: Backend) -> None:
    store = gcs_backend.store(part_size=64 * KiB, upload_concurrency=4)
    state = {"w": torch.randn(700_000)}  # 2.8 MB: 43 parts > 32
    info = store.save(1, state)
    assert torch.equal(store.load(1)["w"], state["w"])
    store.verify(1)
    assert _archives(store, gcs_backend) == [info.path]


def test_parts_are_uploaded_concurrently(gcs_backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    store = gcs_backend.store(part_size=128 * KiB, upload_concurrency=3)
    fs = store.storage.fs
    real = fs.pipe_file  # fsspec puts the sync wrappers on the instance: patched for this store alone
    active, peak, lock = [0], [0], threading.Lock()

    def slow_pipe_file(path: str, value: bytes, **kwargs: Any) -> Any:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)  # long enough for the other uploaders to start
        try:
            return real(path, value, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(fs, "pipe_file", slow_pipe_file)
    state = {"w": torch.randn(500_000)}  # 2 MB: 16 parts
    store.save(1, state)
    assert peak[0] == 3
    assert torch.equal(store.load(1)["w"], state["w"])


def test_a_failed_part_publishes_nothing_and_removes_the_parts(
    gcs_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = gcs_backend.store(part_size=128 * KiB, upload_concurrency=2)
    store.save(1, {"w": torch.zeros(10)})
    fs = store.storage.fs
    real = fs.pipe_file

    def failing_pipe_file(path: str, value: bytes, **kwargs: Any) -> Any:
        if path.endswith(".part00005"):
            raise PermissionError(f"403 Forbidden: {path}")
        return real(path, value, **kwargs)

    monkeypatch.setattr(fs, "pipe_file", failing_pipe_file)
    with pytest.raises(StorageError, match="gs://") as excinfo:
        store.save(2, {"w": torch.randn(500_000)})
    assert "committed snapshots are intact" in str(excinfo.value)
    monkeypatch.undo()
    assert store.itrs() == [1]
    assert _archives(store, gcs_backend) == [store.info(1).path]


def test_gc_removes_parts_left_by_a_crashed_save(gcs_backend: Backend) -> None:
    store = gcs_backend.store()
    store.save(1, {"w": torch.zeros(10)})
    fs, root = fsspec.core.url_to_fs(store.url, **gcs_backend.options)
    leftover = f"{root}/snapshots/000000000002-0123456789abcdef.zip.part00001"
    fs.pipe_file(leftover, b"part of an upload killed before its compose")
    assert store.gc(min_age=0) == ["snapshots/000000000002-0123456789abcdef.zip.part00001"]
    assert _archives(store, gcs_backend) == [store.info(1).path]


def test_upload_concurrency_1_keeps_gcsfs_resumable_upload(gcs_backend: Backend) -> None:
    store = gcs_backend.store(part_size=256 * KiB, upload_concurrency=1)
    writer = store.storage.backend.open_writer(store.storage.path("snapshots/x.zip"), where="x")
    try:
        assert not isinstance(writer.file, PartUploader)
    finally:
        writer.abort()
    state = {"w": torch.randn(500_000)}
    store.save(1, state)
    assert torch.equal(store.load(1)["w"], state["w"])
    assert _archives(store, gcs_backend) == [store.info(1).path]


def test_parts_double_in_size_every_256_parts_up_to_1024() -> None:
    class NoFs:
        pass

    writer = GcsComposeWriter(NoFs(), "b/k", part_size=16 * 2**20, concurrency=2, retry=None, where="gs://b/k")  # type: ignore[arg-type]
    sizes = [writer._next_part_size(n) for n in (1, 256, 257, 513, 1024)]
    assert sizes == [16 * 2**20, 16 * 2**20, 32 * 2**20, 64 * 2**20, 128 * 2**20]
    assert sum(writer._next_part_size(n) for n in range(1, 1025)) == 60 * 2**30
    with pytest.raises(StorageError, match="more than 1024 parts"):
        writer._next_part_size(1025)


def test_two_writers_of_one_object_never_touch_each_others_parts(gcs_backend: Backend) -> None:
    """Replay-buffer chunks are named by content, so two saves may upload the same object at once."""
    from bucketsnap._transport import Retry

    fs, root = fsspec.core.url_to_fs(gcs_backend.url(), **gcs_backend.options)
    path = f"{root}/chunks/0123abcd.zst"
    writers = [
        GcsComposeWriter(fs, path, part_size=64 * KiB, concurrency=2, retry=Retry(), where=f"gs://{path}")
        for _ in range(2)
    ]
    first, second = b"A" * (200 * KiB), b"B" * (200 * KiB)  # 4 parts each
    writers[0].write(first)
    writers[1].write(second)
    writers[0].close()  # composes and deletes its own parts only
    assert fs.cat_file(path) == first
    writers[1].close()
    fs.invalidate_cache()
    assert fs.cat_file(path) == second
    assert fs.find(f"{root}/chunks") == [path]
