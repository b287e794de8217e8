"""Transport: concurrent multipart uploads, retries, threaded writes, prefetching reads, stored frames."""

from __future__ import annotations

import errno
import io
import re
import threading
import uuid
import zipfile
from typing import Any

import numpy as np
import pytest
import torch
import zstandard

from bucketsnap import SnapshotStore, StorageError
from bucketsnap._archive import READ_AHEAD, READ_CHUNK, load_member
from bucketsnap._backends import is_throttled, is_transient
from bucketsnap._backends.s3 import S3MultipartWriter
from bucketsnap._transport import Retry, ThreadedWriter
from conftest import Backend

FAST = Retry(attempts=3, initial=0.001, max_delay=0.01)
MiB = 2**20


class FakeS3:
    """The five S3 calls a multipart upload makes, in memory, with optional faults and a rendezvous."""

    def __init__(self, *, fail: Any = None, barrier: threading.Barrier | None = None) -> None:
        self.objects: dict[str, bytes] = {}
        self.uploads: dict[str, dict[int, bytes]] = {}
        self.calls: list[str] = []
        self.fail = fail
        self.barrier = barrier
        self.active = 0
        self.peak = 0
        self._lock = threading.Lock()

    def split_path(self, path: str) -> tuple[str, str, None]:
        bucket, _, key = path.partition("/")
        return bucket, key, None

    def invalidate_cache(self, path: str | None = None) -> None:
        pass

    def call_s3(self, method: str, **kw: Any) -> dict[str, Any]:
        with self._lock:
            self.calls.append(method)
        if self.fail is not None:
            self.fail(method, kw)
        if method == "create_multipart_upload":
            upload_id = uuid.uuid4().hex
            self.uploads[upload_id] = {}
            return {"UploadId": upload_id}
        if method == "upload_part":
            with self._lock:
                self.active += 1
                self.peak = max(self.peak, self.active)
            try:
                if self.barrier is not None and kw["PartNumber"] <= self.barrier.parties:
                    self.barrier.wait(timeout=10)  # passes only if the first parts are in flight together
                self.uploads[kw["UploadId"]][kw["PartNumber"]] = kw["Body"].read()
            finally:
                with self._lock:
                    self.active -= 1
            return {"ETag": f'"{kw["PartNumber"]}"'}
        if method == "complete_multipart_upload":
            parts = self.uploads.pop(kw["UploadId"])
            numbers = [p["PartNumber"] for p in kw["MultipartUpload"]["Parts"]]
            assert numbers == list(range(1, len(parts) + 1))
            self.objects[kw["Key"]] = b"".join(parts[n] for n in numbers)
            return {}
        if method == "abort_multipart_upload":
            self.uploads.pop(kw["UploadId"])
            return {}
        if method == "put_object":
            self.objects[kw["Key"]] = kw["Body"].read()
            return {}
        raise AssertionError(method)


def upload(fs: FakeS3, data: bytes, *, part_size: int = 5 * MiB, concurrency: int = 3, piece: int = MiB) -> None:
    writer = S3MultipartWriter(
        fs, "bucket/key", part_size=part_size, concurrency=concurrency, retry=FAST, where="s3://b/k"
    )
    try:
        for start in range(0, len(data), piece):
            writer.write(data[start : start + piece])
    except BaseException:
        writer.abort()
        raise
    writer.close()


def test_parts_upload_concurrently_and_never_more_than_concurrency_at_once() -> None:
    data = np.random.default_rng(0).bytes(31 * MiB)  # six full parts and a short last one
    fs = FakeS3(barrier=threading.Barrier(3))
    upload(fs, data, concurrency=3)
    assert fs.objects["key"] == data
    assert fs.peak == 3
    assert fs.calls.count("upload_part") == 7 and not fs.uploads


def test_small_object_is_one_put() -> None:
    fs = FakeS3()
    upload(fs, b"tiny")
    assert fs.calls == ["put_object"] and fs.objects["key"] == b"tiny"


def test_transient_failures_are_retried() -> None:
    failures = {"upload_part": 2, "complete_multipart_upload": 1}

    def fail(method: str, kw: Any) -> None:
        if failures.get(method, 0) > 0:
            failures[method] -= 1
            raise OSError(errno.EBUSY, "SlowDown: Please reduce your request rate.")

    fs = FakeS3(fail=fail)
    data = bytes(range(256)) * (48 * 1024)  # 12 MiB
    upload(fs, data)
    assert fs.objects["key"] == data


@pytest.mark.parametrize("error", [OSError(errno.EBUSY, "SlowDown"), PermissionError("AccessDenied")])
def test_a_failing_part_aborts_the_upload_and_raises_storage_error(error: Exception) -> None:
    def fail(method: str, kw: Any) -> None:
        if method == "upload_part" and kw["PartNumber"] == 2:
            raise error

    fs = FakeS3(fail=fail)
    with pytest.raises(StorageError, match="s3://b/k"):
        upload(fs, bytes(20 * MiB))
    assert "abort_multipart_upload" in fs.calls and not fs.uploads and not fs.objects


def test_retry_classification() -> None:
    class ClientError(Exception):
        def __init__(self, code: str, status: int) -> None:
            super().__init__(code)
            self.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}

    class EndpointConnectionError(Exception):
        pass

    class HttpError(Exception):
        code = 503

    transient = [
        OSError(errno.EBUSY, "SlowDown"),
        ConnectionResetError(),
        TimeoutError(),
        ClientError("InternalError", 500),
        ClientError("Throttling", 400),
        EndpointConnectionError(),
        HttpError(),
    ]
    wrapped = RuntimeError("wrapper")
    wrapped.__cause__ = ConnectionResetError()
    transient.append(wrapped)
    permanent = [FileNotFoundError(), PermissionError(), ClientError("AccessDenied", 403), ValueError("x")]
    assert all(is_transient(e) for e in transient)
    assert not any(is_transient(e) for e in permanent)
    assert is_throttled(ClientError("SlowDown", 503)) and not is_throttled(ConnectionResetError())


def test_retry_gives_up_with_a_storage_error_and_passes_permanent_errors_through() -> None:
    calls = []

    def flaky() -> None:
        calls.append(1)
        raise ConnectionResetError("reset by peer")

    with pytest.raises(StorageError, match=r"3 times.*committed snapshots are intact") as raised:
        FAST.call(flaky, what="read of s3://b/k")
    assert len(calls) == 3 and isinstance(raised.value.__cause__, ConnectionResetError)
    with pytest.raises(PermissionError):
        FAST.call(lambda: (_ for _ in ()).throw(PermissionError("denied")), what="x")


def test_threaded_writer_writes_in_order_and_reports_errors() -> None:
    dest = io.BytesIO()
    writer = ThreadedWriter(dest, part_size=1000)
    data = np.random.default_rng(1).bytes(10_500)
    for start in range(0, len(data), 333):
        writer.write(data[start : start + 333])
    writer.close()
    assert dest.getvalue() == data

    class Broken(io.BytesIO):
        def write(self, b: Any) -> int:
            raise OSError(errno.EIO, "disk on fire")

    writer = ThreadedWriter(Broken(), part_size=10, depth=1)
    with pytest.raises(OSError, match="disk on fire"):
        for _ in range(100):
            writer.write(b"x" * 10)
        writer.close()
    writer.abort()


def test_prefetching_reader_reads_concurrently_and_never_past_the_member() -> None:
    store = SnapshotStore("memory://transport/prefetch", compression_level=1)
    info = store.save(1, {"big": torch.randn(5 * READ_CHUNK // 4), "small": torch.randn(10)})
    member = info.members["big"]
    raw = store.storage.read(info.path)
    barrier = threading.Barrier(min(READ_AHEAD, 5))
    ranges: list[tuple[int, int]] = []
    end_of_member = member.offset + member.stored_size

    def read_range(start: int, end: int) -> bytes:
        ranges.append((start, end))
        frame_reads = sum(e != end_of_member for _, e in ranges)  # the first read is the index, the member's end
        if end != end_of_member and frame_reads <= barrier.parties:
            barrier.wait(timeout=10)  # the first reads of frames are in flight together
        return raw[start:end]

    value = load_member(read_range, member, where="test")
    assert torch.equal(value, store.load(1, keys=["big"])["big"])
    assert min(s for s, _ in ranges) == member.offset
    assert max(e for _, e in ranges) == member.offset + member.stored_size
    assert sum(e - s for s, e in ranges) == member.stored_size


def test_incompressible_members_are_stored_and_any_zstd_reads_them(tmp_path: Any) -> None:
    store = SnapshotStore(str(tmp_path / "run"))
    weights = torch.randn(300_000)
    frames = np.zeros((64, 84, 84), dtype=np.uint8)
    info = store.save(1, {"weights": weights, "frames": frames})
    w, f = info.members["weights"], info.members["frames"]
    # Stored raw: no more than docs/format.md's framing adds. A frame holds at most 1 MiB, the header has a frame
    # of its own, and each frame costs at most an 18-byte frame header, 3 bytes per raw block of at most 128 KiB,
    # and 12 bytes of the index, whose own header and footer take 16.
    n = 2 + w.raw_size // (1 << 20) + 1
    framing = 18 * n + 3 * (w.raw_size // (128 * 1024) + n) + 12 * n + 16
    assert w.raw_size < w.stored_size <= w.raw_size + framing
    assert f.stored_size * 100 < f.raw_size
    with zipfile.ZipFile(tmp_path / "run" / info.path) as archive:
        stored = io.BytesIO(archive.read(w.name))  # frames, then the skippable index: a multi-frame reader
        payload = zstandard.ZstdDecompressor().stream_reader(stored, read_across_frames=True).read()
    assert len(payload) == w.raw_size and payload.endswith(weights.numpy().tobytes())
    restored = store.load(1)
    assert torch.equal(restored["weights"], weights) and np.array_equal(restored["frames"], frames)
    store.verify(1)


@pytest.mark.s3
def test_s3_save_with_concurrent_parts_and_injected_throttling(s3_backend: Backend, monkeypatch: Any) -> None:
    store = s3_backend.store("transport", part_size=5 * MiB, upload_concurrency=3)
    store.save(1, {"w": torch.zeros(10)})
    fs: Any = store.storage.fs
    original = fs.call_s3
    throttled: list[int] = []

    def throttling(method: str, *args: Any, **kw: Any) -> Any:
        if method == "upload_part" and kw["PartNumber"] in (2, 3) and len(throttled) < 2:
            throttled.append(kw["PartNumber"])
            raise OSError(errno.EBUSY, "SlowDown: Please reduce your request rate.")
        return original(method, *args, **kw)

    monkeypatch.setattr(fs, "call_s3", throttling)
    weights = torch.randn(4 * MiB)  # 16 MiB: four parts
    store.save(2, {"w": weights})
    assert throttled == [2, 3] or sorted(throttled) == [2, 3]
    assert torch.equal(store.load(2)["w"], weights)

    def failing(method: str, *args: Any, **kw: Any) -> Any:
        if method == "upload_part" and kw["PartNumber"] == 3:
            raise ConnectionResetError("connection reset by peer")
        return original(method, *args, **kw)

    monkeypatch.setattr(fs, "call_s3", failing)
    store.storage.retry = FAST
    with pytest.raises(StorageError, match=re.escape(store.url)):
        store.save(3, {"w": weights})
    monkeypatch.setattr(fs, "call_s3", original)
    assert store.itrs() == [1, 2]
    store.verify(2)
    bucket, _, _ = fs.split_path(store.storage.path(""))
    uploads = fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])
    assert not [u for u in uploads if u["Key"].startswith(store.storage.root.split("/", 1)[1])], "upload not aborted"


@pytest.mark.s3
def test_the_retry_policy_is_a_store_option(s3_backend: Backend) -> None:
    import servers

    options = dict(s3_backend.options)
    dead = f"http://127.0.0.1:{servers.free_port()}"
    options["client_kwargs"] = {**options["client_kwargs"], "endpoint_url": dead}
    options["config_kwargs"] = {**options["config_kwargs"], "retries": {"max_attempts": 1}, "connect_timeout": 1}
    store = SnapshotStore(s3_backend.url(), storage_options=options, retry=Retry(attempts=2, initial=0, max_delay=0))
    with pytest.raises(StorageError, match="failed 2 times"):
        store.itrs()
