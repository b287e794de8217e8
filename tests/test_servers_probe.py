"""Probe what the local object stores really do for the behaviours bucketsnap's
commit protocol relies on, through s3fs / gcsfs exactly as the library uses them.

Backends: LocalStack (S3), moto's ThreadedMotoServer (S3, for comparison) and
fake-gcs-server (GCS). A server that fails to start errors the tests (with its
log); nothing here is skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import s3fs

from servers import (  # sets GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT; import gcsfs lazily
    FakeGcsServer,
    GcsServer,
    LocalStackServer,
    S3Server,
    gcs_server,
    gcs_storage_options,
    s3_server,
    s3_storage_options,
)

# gcsfs hands aiohttp >1 MiB bytes bodies, which warns ResourceWarning; the
# project's filterwarnings=error::ResourceWarning would turn that into a failed write.
pytestmark = pytest.mark.filterwarnings("ignore:Sending a large body directly:ResourceWarning")

MiB = 2**20
BLOCK = 5 * MiB
PIECES = [bytes([i]) * MiB for i in range(12)]  # 12 MiB in 1 MiB writes
DATA = b"".join(PIECES)


@pytest.fixture(scope="module")
def localstack() -> Iterator[S3Server]:
    server = s3_server()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def moto() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # per-request lines
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield S3Server(endpoint_url=f"http://{host}:{port}")
    server.stop()


@pytest.fixture(scope="module")
def fake_gcs() -> Iterator[GcsServer]:
    server = gcs_server()
    yield server
    server.stop()


@dataclass
class Store:
    backend: str
    server: S3Server | GcsServer
    fs: Any  # fsspec.AbstractFileSystem (s3fs or gcsfs)
    bucket: str

    @property
    def is_s3(self) -> bool:
        return isinstance(self.server, S3Server)

    def path(self, key: str) -> str:
        return f"{self.bucket}/{key}"

    def exists(self, key: str) -> bool:
        self.fs.invalidate_cache()
        return bool(self.fs.exists(self.path(key)))

    def pending_uploads(self) -> list[str]:
        """Keys with unfinished S3 multipart uploads."""
        assert isinstance(self.server, S3Server)
        out = self.server.client().list_multipart_uploads(Bucket=self.bucket)
        return [u["Key"] for u in out.get("Uploads", [])]


@pytest.fixture(
    params=[
        pytest.param("localstack", marks=pytest.mark.s3),
        pytest.param("moto", marks=pytest.mark.s3),
        pytest.param("fake_gcs", marks=pytest.mark.gcs),
    ]
)
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    server = request.getfixturevalue(request.param)
    bucket = server.create_bucket()
    fs: Any
    if isinstance(server, S3Server):
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_storage_options(server))
    else:
        import gcsfs

        fs = gcsfs.GCSFileSystem(skip_instance_cache=True, **gcs_storage_options(server))
    yield Store(request.param, server, fs, bucket)
    server.reset()


def abort_write(f: Any) -> None:
    """Abort an open s3fs/gcsfs write file without publishing anything.

    discard() aborts the multipart/resumable upload, but s3fs leaves the file
    "open" (a later close() raises AttributeError, also from __del__) and gcsfs
    leaves it open when no upload was started yet (close() would then publish
    the buffer). Marking it closed makes both inert.
    """
    f.discard()
    f.closed = True


# --------------------------------------------------------------- (a) create


def test_pipe_file_create_is_exclusive(store: Store) -> None:
    p = store.path("exclusive/obj")
    store.fs.pipe_file(p, b"first", mode="create")
    # All three raise exactly FileExistsError: s3fs maps 412 PreconditionFailed
    # with Condition "If-None-Match"; gcsfs maps any 412 (ifGenerationMatch=0).
    with pytest.raises(FileExistsError) as info:
        store.fs.pipe_file(p, b"second", mode="create")
    assert type(info.value) is FileExistsError
    store.fs.invalidate_cache()
    assert store.fs.cat_file(p) == b"first"


def test_streaming_exclusive_create(store: Store) -> None:
    """open(mode="xb"): S3 checks If-None-Match at CompleteMultipartUpload;
    fake-gcs-server v1.54 ignores ifGenerationMatch on resumable uploads (which
    gcsfs always uses for open()), so there the existing object is overwritten."""
    p = store.path("exclusive/stream")
    store.fs.pipe_file(p, b"first")
    f = store.fs.open(p, "xb", block_size=BLOCK)
    for piece in PIECES:
        f.write(piece)
    if store.is_s3:
        with pytest.raises(FileExistsError):
            f.close()
        store.fs.invalidate_cache()
        assert store.fs.cat_file(p) == b"first"
        # s3fs does not abort the rejected multipart upload: the caller must.
        assert store.pending_uploads() == ["exclusive/stream"]
    else:
        f.close()  # emulator bug (fsouza/fake-gcs-server#1967); real GCS raises 412
        store.fs.invalidate_cache()
        assert store.fs.info(p)["size"] == len(DATA)


# ------------------------------------------------------ (b) streaming writes


def test_streaming_write_invisible_until_close(store: Store) -> None:
    p = store.path("stream/big")
    with store.fs.open(p, "wb", block_size=BLOCK) as f:
        for piece in PIECES:
            f.write(piece)
        assert f.offset >= 10 * MiB  # two blocks already sent to the server
        assert not store.exists("stream/big")
    assert store.exists("stream/big")
    assert store.fs.info(p)["size"] == len(DATA)
    assert store.fs.cat_file(p) == DATA
    if store.is_s3:
        assert store.pending_uploads() == []


@pytest.mark.parametrize("size", [len(DATA), 1000], ids=["multipart", "small"])
def test_discard_aborts_streaming_write(store: Store, size: int) -> None:
    p = store.path("stream/aborted")
    f = store.fs.open(p, "wb", block_size=BLOCK)
    f.write(DATA[:size])
    abort_write(f)
    f.close()  # no-op now
    assert not store.exists("stream/aborted")
    if store.is_s3:
        assert store.pending_uploads() == []


def test_exception_in_with_block_still_publishes(store: Store) -> None:
    """fsspec's file __exit__ ignores the exception and closes = commits."""
    p = store.path("stream/partial")
    with pytest.raises(RuntimeError), store.fs.open(p, "wb", block_size=BLOCK) as f:
        f.write(DATA[: 6 * MiB])
        raise RuntimeError("writer failed")
    assert store.exists("stream/partial")
    assert store.fs.info(p)["size"] == 6 * MiB


# ------------------------------------------------------------ (c) ranges

RANGE_DATA = bytes(range(256)) * 4  # 1024 bytes


@pytest.mark.parametrize(
    ("start", "end"),
    [(0, 1), (10, 20), (1000, 1024), (1000, 5000), (1020, None), (None, 5), (-10, None)],
)
def test_ranged_reads(store: Store, start: int | None, end: int | None) -> None:
    p = store.path("ranges/obj")
    store.fs.pipe_file(p, RANGE_DATA)
    # keywords: s3fs's signature is cat_file(path, version_id, start, end)
    assert store.fs.cat_file(p, start=start, end=end) == RANGE_DATA[start:end]


# -------------------------------------------------------------- (d) ls / rm


def test_ls_and_rm(store: Store) -> None:
    fs = store.fs
    for key in ["d/a", "d/b", "d/sub/c", "e"]:
        fs.pipe_file(store.path(key), b"1")

    def ls(key: str) -> list[str]:
        fs.invalidate_cache()
        return sorted(fs.ls(store.path(key), detail=False))

    assert ls("d") == [store.path(k) for k in ["d/a", "d/b", "d/sub"]]
    assert ls("d/") == ls("d")
    fs.rm(store.path("d/a"))
    assert ls("d") == [store.path(k) for k in ["d/b", "d/sub"]]
    fs.rm(store.path("d"), recursive=True)
    with pytest.raises(FileNotFoundError):
        ls("d")
    assert ls("") == [store.path("e")]
    # removing a missing key: s3fs is silent, gcsfs raises FileNotFoundError
    if store.is_s3:
        fs.rm(store.path("missing"))
    else:
        with pytest.raises(FileNotFoundError):
            fs.rm(store.path("missing"))


# ---------------------------------------------------------- server helpers


def test_reset_removes_buckets(store: Store) -> None:
    store.fs.pipe_file(store.path("k"), b"v")
    if isinstance(store.server, S3Server):
        client = store.server.client()
        client.create_multipart_upload(Bucket=store.bucket, Key="pending")
        store.server.reset()
        names = [b["Name"] for b in client.list_buckets()["Buckets"]]
    else:
        store.server.reset()
        listing = store.server.request("GET", "b?project=p") or {}
        names = [b["name"] for b in listing.get("items", [])]
    assert store.bucket not in names
    if store.server.owns_all_buckets:
        assert names == []


def test_servers_are_local(localstack: S3Server, fake_gcs: GcsServer) -> None:
    for server in (localstack, fake_gcs):
        if server.owns_all_buckets:
            assert server.endpoint_url.startswith("http://127.0.0.1:")
            assert server.startup_seconds < 30


def test_failed_start_raises_with_log(tmp_path: Path) -> None:
    gcs = FakeGcsServer(extra_args=["-no-such-flag"])
    with pytest.raises(RuntimeError, match="flag provided but not defined"):
        gcs.start()
    fake_python = tmp_path / "bin" / "python"
    fake_python.parent.mkdir()
    fake_python.write_text("#!/bin/sh\necho boom from fake localstack\nexit 3\n")
    fake_python.chmod(0o755)
    ls = LocalStackServer(venv=tmp_path)
    with pytest.raises(RuntimeError, match=r"exited with code 3(.|\n)*boom from fake localstack"):
        ls.start()
    assert ls.workdir is None and gcs.workdir is None  # temp dirs removed
    with pytest.raises(RuntimeError, match=r"localstack/setup\.sh"):
        LocalStackServer(venv=tmp_path / "missing").start()


def test_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUCKETSNAP_TEST_S3_ENDPOINT", "http://s3.example:9000")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ak")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sk")
    monkeypatch.setenv("BUCKETSNAP_TEST_GCS_ENDPOINT", "http://gcs.example:4443/")
    s3 = s3_server()
    assert type(s3) is S3Server and not s3.owns_all_buckets
    opts = s3_storage_options(s3)
    assert (opts["key"], opts["secret"]) == ("ak", "sk")
    assert opts["client_kwargs"]["endpoint_url"] == "http://s3.example:9000"
    gcs = gcs_server()
    assert type(gcs) is GcsServer
    assert gcs_storage_options(gcs)["endpoint_url"] == "http://gcs.example:4443"
