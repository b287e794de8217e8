"""The storage contract: what every backend module must do for the commit protocol to hold.

:class:`StorageContract` states it once, from docs/backends.md's and the storage layer's promises, and each
backend's subclass runs it against the real thing: fsspec's memory filesystem, a temp directory, LocalStack,
fake-gcs-server, Azurite, and a filesystem with no backend module of its own (the generic fsspec fallback).
A new backend module adds one subclass here (fsspec's abstract test mixins are the model).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar

import fsspec
import pytest
import torch
from fsspec.implementations.dirfs import DirFileSystem

from bucketsnap._backends import backend_class
from bucketsnap._backends.base import Backend as GenericBackend
from bucketsnap._storage import Storage
from bucketsnap._transport import Retry
from bucketsnap.errors import StorageError
from conftest import Backend

KiB = 1024
MiB = 1024 * KiB
#: Bigger than two parts of every backend's streamed writer (S3's smallest part is 5 MiB), so that parts are
#: really uploaded before the write is committed or aborted.
STREAMED = 12 * MiB


@dataclass
class Place:
    """A fresh, empty run root: its URL, storage options and the Storage arguments to open it with."""

    url: str
    options: dict[str, Any] = field(default_factory=dict)
    kwargs: dict[str, Any] = field(default_factory=dict)

    def open(self, **kwargs: Any) -> Storage:
        return Storage(self.url, storage_options=self.options, **{**self.kwargs, **kwargs})


class StorageContract:
    """The contract; a subclass provides the ``storage`` fixture (a fresh, empty run root) and its facts."""

    #: Whether concurrent exclusive creates of one name must leave exactly one winner.
    atomic: ClassVar[bool] = True
    #: Whether a streamed write is invisible until committed (the generic fallback has whatever its fs does).
    invisible_writes: ClassVar[bool] = True
    #: The backend class that the URL's protocol must resolve to.
    backend: ClassVar[str] = ""

    @pytest.fixture
    def place(self) -> Place:  # pragma: no cover - every subclass overrides it
        raise NotImplementedError

    @pytest.fixture
    def storage(self, place: Place) -> Storage:
        return place.open()

    # -- which backend --------------------------------------------------------------------------------------

    def test_the_protocol_resolves_to_its_backend_module(self, storage: Storage) -> None:
        assert type(storage.backend).__name__ == self.backend
        assert storage.atomic_create is self.atomic

    # -- exclusive create -----------------------------------------------------------------------------------

    def test_exclusive_create_is_refused_the_second_time(self, storage: Storage) -> None:
        storage.create_exclusive("manifest/0001.json", b"first")
        with pytest.raises(FileExistsError):
            storage.create_exclusive("manifest/0001.json", b"second")
        assert storage.read("manifest/0001.json") == b"first"

    def test_racing_exclusive_creates_leave_one_winner(self, storage: Storage) -> None:
        if not self.atomic:
            pytest.skip("this backend promises no atomic create (Storage warns that it is check-then-write)")
        storage.create_exclusive("manifest/warm.json", b"x")  # the probe and the connections, out of the race
        winners: list[bytes] = []
        errors: list[BaseException] = []
        start = threading.Barrier(8)

        def create(i: int) -> None:
            data = f"writer {i}".encode()
            start.wait()
            try:
                storage.create_exclusive("manifest/0002.json", data)
                winners.append(data)
            except FileExistsError:
                pass
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert len(winners) == 1
        assert storage.read("manifest/0002.json") == winners[0]

    # -- streamed writes ------------------------------------------------------------------------------------

    def test_a_write_is_invisible_until_it_is_committed(self, storage: Storage) -> None:
        data = os.urandom(STREAMED)
        with storage.write("snapshots/a.zip") as f:
            for i in range(0, len(data), MiB):
                f.write(data[i : i + MiB])
            if self.invisible_writes:
                assert not storage.exists("snapshots/a.zip")
                assert "a.zip" not in storage.list("snapshots")
        assert storage.read("snapshots/a.zip") == data
        assert storage.size("snapshots/a.zip") == len(data)

    def test_an_aborted_write_leaves_nothing(self, storage: Storage) -> None:
        with pytest.raises(RuntimeError, match="the caller failed"), storage.write("snapshots/b.zip") as f:
            f.write(os.urandom(STREAMED))
            raise RuntimeError("the caller failed")
        assert not storage.exists("snapshots/b.zip")
        assert storage.list("snapshots") == []  # no temp file, part object or uncommitted blob listed

    def test_a_write_replaces_an_object_whole(self, storage: Storage) -> None:
        with storage.write("snapshots/c.zip") as f:
            f.write(b"old")
        with storage.write("snapshots/c.zip") as f:
            f.write(b"new contents")
        assert storage.read("snapshots/c.zip") == b"new contents"

    def test_an_empty_write_commits_an_empty_object(self, storage: Storage) -> None:
        with storage.write("snapshots/empty.zip"):
            pass
        assert storage.read("snapshots/empty.zip") == b""
        assert storage.size("snapshots/empty.zip") == 0

    # -- reads ----------------------------------------------------------------------------------------------

    def test_ranged_reads_are_exact(self, storage: Storage) -> None:
        data = os.urandom(MiB + 17)
        with storage.write("snapshots/d.zip") as f:
            f.write(data)
        n = len(data)
        for start, end in [(0, 1), (0, n), (1, 2), (1000, 70_000), (n - 1, n), (n - 22, n), (12345, 12345 + MiB // 2)]:
            assert storage.read("snapshots/d.zip", start, end) == data[start:end], (start, end)
        assert storage.read("snapshots/d.zip") == data
        assert storage.read("snapshots/d.zip", 5000, None) == data[5000:]

    def test_a_ranged_read_into_a_buffer_fills_exactly_that_range(self, storage: Storage) -> None:
        """Storage.read_into: the bytes [start, start + len(buffer)) land in the buffer, nothing around them
        changes, a range past the object's end gives the bytes there are, and the read is counted."""
        data = os.urandom(5 * MiB + 17)
        with storage.write("snapshots/d.zip") as f:
            f.write(data)
        n = len(data)
        for start, length in [(0, 1), (0, n), (1, 2), (1000, 70_000), (n - 1, 1), (12345, 4 * MiB + 3)]:
            guarded = bytearray(b"\xaa" * (length + 2 * KiB))
            before = storage.read_requests
            got = storage.read_into("snapshots/d.zip", start, memoryview(guarded)[KiB : KiB + length])
            assert got == length, (start, length)
            assert guarded[KiB : KiB + length] == data[start : start + length], (start, length)
            assert guarded[:KiB] == guarded[KiB + length :] == b"\xaa" * KiB  # no byte written outside it
            assert storage.read_requests == before + 1
        tail = bytearray(100)
        assert storage.read_into("snapshots/d.zip", n - 40, tail) == 40  # the object ends first
        assert tail[:40] == data[n - 40 :]
        into_tensor = torch.zeros(1000, dtype=torch.float32)  # any writable buffer: a tensor's bytes, say
        assert storage.read_into("snapshots/d.zip", 8, into_tensor.numpy()) == 4000
        assert into_tensor.numpy().tobytes() == data[8:4008]
        with pytest.raises(FileNotFoundError):
            storage.read_into("snapshots/missing.zip", 0, bytearray(10))

    def test_a_read_starting_at_or_past_the_objects_end_gives_no_bytes(self, storage: Storage) -> None:
        """A range the object does not reach (a snapshot's archive truncated or replaced by a shorter one) reads
        as no bytes, as from a local file, so a restore reports the archive truncated (CorruptSnapshotError);
        S3 and GCS answer it with 416, which became a StorageError, "HttpError: , 416" on GCS."""
        with storage.write("snapshots/d.zip") as f:
            f.write(b"0123456789")
        for start, end in [(10, 20), (20, 30), (10, 11)]:
            assert storage.read("snapshots/d.zip", start, end) == b"", (start, end)
            assert storage.read_into("snapshots/d.zip", start, bytearray(end - start)) == 0, (start, end)
        assert storage.read("snapshots/d.zip", 8, 30) == b"89"

    def test_reading_a_missing_object_is_file_not_found(self, storage: Storage) -> None:
        with pytest.raises(FileNotFoundError):
            storage.read("snapshots/missing.zip")
        with pytest.raises(FileNotFoundError):
            storage.read("snapshots/missing.zip", 0, 10)
        with pytest.raises(FileNotFoundError):
            storage.size("snapshots/missing.zip")
        assert not storage.exists("snapshots/missing.zip")

    # -- metadata -------------------------------------------------------------------------------------------

    def test_modified_is_never_none_and_is_the_time_of_the_write(self, storage: Storage) -> None:
        before = time.time()
        with storage.write("snapshots/e.zip") as f:
            f.write(b"archive")
        storage.create_exclusive("manifest/0003.json", b"{}")
        for rel in ("snapshots/e.zip", "manifest/0003.json"):
            modified = storage.modified(rel)
            assert modified is not None, f"{rel}: gc would delete a concurrent writer's object at once"
            assert before - 300 <= modified <= time.time() + 300, (rel, modified, before)

    def test_listing_names_sizes_and_nothing_for_a_missing_directory(self, storage: Storage) -> None:
        storage.create_exclusive("manifest/0004.json", b"1234")
        with storage.write("snapshots/f.zip") as f:
            f.write(b"123456")
        with storage.write("chunks/deep/g.zst") as f:
            f.write(b"12")
        assert storage.list("snapshots") == ["f.zip"]
        assert storage.list_sizes("snapshots") == {"f.zip": 6}
        assert storage.list_sizes("manifest") == {"0004.json": 4}
        assert "deep" in storage.list("chunks") and storage.list_sizes("chunks") == {}
        assert sorted(storage.list("")) == ["chunks", "manifest", "snapshots"]
        assert storage.list("nothing-here") == [] and storage.list_sizes("nothing-here") == {}

    def test_a_listing_sees_objects_another_client_wrote_since(self, storage: Storage, place: Place) -> None:
        fsspec.AbstractFileSystem.clear_instance_cache()  # another client: not the cached filesystem instance
        other = place.open()
        with storage.write("snapshots/mine.zip") as f:
            f.write(b"x")
        assert storage.list("snapshots") == ["mine.zip"]  # a client may cache this listing...
        with other.write("snapshots/h.zip") as f:
            f.write(b"from elsewhere")
        # ...but a lookup of one object must not answer from it (gc and the commit fence rely on this)
        assert storage.exists("snapshots/h.zip") and storage.is_file("snapshots/h.zip")
        assert storage.size("snapshots/h.zip") == len(b"from elsewhere")
        assert storage.modified("snapshots/h.zip") is not None
        assert storage.list("snapshots") == ["h.zip", "mine.zip"]
        other.delete("snapshots/h.zip")
        assert not storage.exists("snapshots/h.zip") and storage.list("snapshots") == ["mine.zip"]

    def test_is_file_tells_an_object_from_a_directory_and_nothing(self, storage: Storage) -> None:
        with storage.write("snapshots/i.zip") as f:
            f.write(b"x")
        assert storage.is_file("snapshots/i.zip")
        assert not storage.is_file("snapshots")
        assert not storage.is_file("snapshots/missing.zip")

    # -- delete ---------------------------------------------------------------------------------------------

    def test_delete_removes_and_a_missing_object_is_not_an_error(self, storage: Storage) -> None:
        with storage.write("snapshots/j.zip") as f:
            f.write(b"x")
        storage.delete("snapshots/j.zip")
        assert not storage.exists("snapshots/j.zip")
        storage.delete("snapshots/j.zip")
        storage.delete("snapshots/never-there.zip")

    # -- errors ---------------------------------------------------------------------------------------------

    def test_errors_are_classified(self, storage: Storage) -> None:
        backend = storage.backend
        assert not backend.is_transient(FileNotFoundError("x"))
        assert not backend.is_transient(FileExistsError("x"))
        assert not backend.is_transient(PermissionError("x"))
        assert backend.is_transient(ConnectionResetError())
        assert backend.is_transient(TimeoutError())
        assert not backend.is_throttled(ConnectionResetError())


class TestMemory(StorageContract):
    backend = "MemoryBackend"

    @pytest.fixture
    def place(self, memory_backend: Backend) -> Place:
        return Place(memory_backend.url())


class TestLocal(StorageContract):
    backend = "LocalBackend"

    @pytest.fixture
    def place(self, local_backend: Backend) -> Place:
        return Place(local_backend.url())

    def test_a_write_into_a_path_under_a_file_is_a_storage_error(self, storage: Storage) -> None:
        storage.create_exclusive("blocker", b"a file where a directory should be")
        with pytest.raises(StorageError, match="blocker"), storage.write("blocker/k.zip") as f:
            f.write(b"x")


class _Remote(StorageContract):
    """Object stores on test servers: also, an endpoint that does not answer is a transient failure."""

    name: ClassVar[str]

    @pytest.fixture
    def place(self, request: pytest.FixtureRequest) -> Place:
        backend: Backend = request.getfixturevalue(f"{self.name}_backend")
        return Place(backend.url(), backend.options, {"part_size": 256 * KiB, "upload_concurrency": 3})

    def unreachable_options(self, options: dict[str, Any], endpoint: str) -> dict[str, Any]:
        return {**options, "endpoint_url": endpoint}

    def test_an_endpoint_that_does_not_answer_is_a_transient_storage_error(self, place: Place) -> None:
        import servers

        endpoint = f"http://127.0.0.1:{servers.free_port()}"
        options = self.unreachable_options(place.options, endpoint)
        dead = Storage(place.url, storage_options=options, retry=Retry(attempts=1))
        with pytest.raises(StorageError) as caught:
            dead.read("manifest/0001.json")
        assert dead.url in str(caught.value)
        assert caught.value.__cause__ is not None and dead.backend.is_transient(caught.value.__cause__)


class _PiecesInPlace:
    """S3 and GCS: read_into copies each piece of the response body into the buffer as aiohttp receives it."""

    def test_a_read_into_copies_the_responses_pieces_and_never_joins_them(
        self, storage: Storage, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        import aiohttp.streams

        data = os.urandom(3 * MiB + 5)
        with storage.write("snapshots/d.zip") as f:
            f.write(data)

        def joined(*args: Any, **kwargs: Any) -> bytes:
            raise AssertionError("the body was joined into one bytes object")

        monkeypatch.setattr(aiohttp.streams.StreamReader, "read", joined)  # what s3fs's and gcsfs's reads call
        monkeypatch.setattr(aiohttp.streams.StreamReader, "readany", joined)
        buffer = bytearray(3 * MiB)
        assert storage.read_into("snapshots/d.zip", 5, buffer) == len(buffer)
        assert buffer == data[5 : 5 + len(buffer)]
        with pytest.raises(StorageError, match="joined"):
            storage.read("snapshots/d.zip", 5, 5 + len(buffer))  # the monkeypatch does bite the plain read

    def test_a_body_cut_short_of_its_content_range_is_retried_not_returned_short(
        self, storage: Storage, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Found by review: a response whose connection closed early (or that declared a smaller length) made
        read_into return fewer bytes, which a restore reported as a truncated, corrupt snapshot."""
        import importlib

        module = importlib.import_module(type(storage.backend).__module__)
        data = os.urandom(2 * MiB)
        with storage.write("snapshots/d.zip") as f:
            f.write(data)
        real, cuts = module.read_body_into, []

        async def cut_once(content: Any, buffer: memoryview) -> int:
            got = await real(content, buffer)
            if not cuts:
                cuts.append(got)
                return got // 2  # what a body cut halfway through, its connection closed, delivers
            return got

        monkeypatch.setattr(module, "read_body_into", cut_once)
        buffer = bytearray(MiB)
        assert storage.read_into("snapshots/d.zip", 7, buffer) == MiB and cuts == [MiB]
        assert buffer == data[7 : 7 + MiB]


class TestS3(_PiecesInPlace, _Remote):
    name = "s3"
    backend = "S3Backend"
    pytestmark = pytest.mark.s3

    def unreachable_options(self, options: dict[str, Any], endpoint: str) -> dict[str, Any]:
        return {
            **options,
            "client_kwargs": {**options["client_kwargs"], "endpoint_url": endpoint},
            "config_kwargs": {**options["config_kwargs"], "retries": {"max_attempts": 1}, "connect_timeout": 2},
        }


class TestGcs(_PiecesInPlace, _Remote):
    name = "gcs"
    backend = "GcsBackend"
    pytestmark = pytest.mark.gcs

    def test_a_read_into_a_requester_pays_bucket_names_the_project_that_pays(
        self, place: Place, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Found by review: read_into left out gcsfs's ``userProject``, which GCS requires on such a bucket."""
        import aiohttp

        storage = Storage(place.url, storage_options={**place.options, "requester_pays": "the-payer"})
        storage.create_exclusive("snapshots/d.zip", b"0123456789")
        sent: list[Any] = []
        get = aiohttp.ClientSession.get

        def recording(self: Any, url: Any, **kwargs: Any) -> Any:
            sent.append(kwargs.get("params"))
            return get(self, url, **kwargs)

        monkeypatch.setattr(aiohttp.ClientSession, "get", recording)
        buffer = bytearray(4)
        assert storage.read_into("snapshots/d.zip", 2, buffer) == 4 and buffer == b"2345"
        assert sent and all(p and p.get("userProject") == "the-payer" for p in sent), sent


class TestAzure(_Remote):
    name = "azure"
    backend = "AzureBackend"
    pytestmark = pytest.mark.azure

    def unreachable_options(self, options: dict[str, Any], endpoint: str) -> dict[str, Any]:
        connection = options["connection_string"].split("BlobEndpoint=")[0]
        return {**options, "connection_string": f"{connection}BlobEndpoint={endpoint}/devstoreaccount1;"}


class TestGenericFsspec(StorageContract):
    """A filesystem no backend module claims (fsspec's ``dir://`` over memory): the generic fallback."""

    backend = "Backend"
    atomic = False
    invisible_writes = False  # fsspec's memory filesystem publishes a file when it is opened (an abort removes it)

    @pytest.fixture
    def place(self) -> Place:
        options = {"path": f"/generic-{uuid.uuid4().hex[:8]}", "target_protocol": "memory"}
        fs = fsspec.filesystem("dir", **options)
        assert isinstance(fs, DirFileSystem) and backend_class(fs) is GenericBackend
        return Place("dir://run", options)


def test_a_412_in_an_error_text_is_not_a_refused_create() -> None:
    """Only a status field or an error code says "the name exists": a port, a host or a request id may hold 412."""
    refused = ConnectionRefusedError("Cannot connect to host 10.0.0.5:41250")
    assert not GenericBackend.is_precondition_failure(refused)
    assert not GenericBackend.is_precondition_failure(OSError("http://s3.internal:9412/bucket: 500 InternalError"))
    assert GenericBackend.is_precondition_failure(OSError("412 Precondition Failed"))
    answer = OSError("conditional request failed")
    answer.response = {"Error": {"Code": "PreconditionFailed"}, "ResponseMetadata": {"HTTPStatusCode": 412}}  # type: ignore[attr-defined]
    assert GenericBackend.is_precondition_failure(answer)


def test_a_server_answering_a_range_with_more_bytes_than_asked_is_a_storage_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server that ignores Range sends the whole object: read_into never takes its start for the range."""
    storage = Storage(f"memory://more-{uuid.uuid4().hex[:8]}/run")
    storage.create_exclusive("snapshots/d.zip", b"0123456789")
    monkeypatch.setattr(type(storage.backend), "read", lambda self, path, start=None, end=None: b"0123456789")
    with pytest.raises(StorageError, match=r"^storage operation on memory://more-.*/run/snapshots/d.zip failed: "):
        storage.read_into("snapshots/d.zip", 2, bytearray(4))


def test_a_part_size_below_one_byte_is_refused() -> None:
    with pytest.raises(ValueError, match="part_size"):
        Storage("memory://x/run", part_size=0)
