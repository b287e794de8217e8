"""The Azure Blob test server (Azurite, tests/servers.py) and what adlfs does against it: the raw
behaviours an Azure backend builds on (exclusive create, staged blocks invisible until committed,
ranged reads, listing fields). A server that fails to start errors the tests, with its log.
"""

from __future__ import annotations

import datetime
import socket
import uuid
from typing import Any

import fsspec
import pytest
from fsspec.asyn import sync

import servers
from helpers import run_together

pytestmark = pytest.mark.azure

DATA = bytes(range(256)) * 64  # 16 KiB


@pytest.fixture
def fs(azure_server: servers.AzureServer) -> Any:
    import adlfs

    return adlfs.AzureBlobFileSystem(skip_instance_cache=True, **servers.azure_storage_options(azure_server))


@pytest.fixture
def root(azure_backend: Any) -> str:
    """A fresh prefix in the session's container, without the protocol: "<container>/t-<hex>"."""
    return f"{azure_backend.base.removeprefix('az://')}/t-{uuid.uuid4().hex[:8]}"


def test_round_trip(fs: Any, root: str) -> None:
    fs.pipe_file(f"{root}/a.bin", DATA)
    fs.pipe_file(f"{root}/sub/b.bin", b"b")
    assert fs.cat_file(f"{root}/a.bin") == DATA
    assert fs.cat_file(f"{root}/a.bin", 100, 200) == DATA[100:200]
    assert fs.cat_file(f"{root}/a.bin", len(DATA) - 10, len(DATA) + 100) == DATA[-10:]  # clipped at the end
    assert sorted(fs.ls(root, detail=False)) == [f"{root}/a.bin", f"{root}/sub"]

    entry = next(e for e in fs.ls(root, detail=True) if e["type"] == "file")
    info = fs.info(f"{root}/a.bin")
    for found in (entry, info):
        assert found["size"] == len(DATA)
        for key in ("last_modified", "creation_time"):  # datetimes, in UTC, to the second
            assert isinstance(found[key], datetime.datetime)
            assert found[key].utcoffset() == datetime.timedelta(0)
            assert abs(found[key] - datetime.datetime.now(datetime.timezone.utc)) < datetime.timedelta(minutes=5)

    fs.rm_file(f"{root}/a.bin")
    fs.invalidate_cache()  # adlfs caches listings: info()/exists() would still see the deleted blob
    assert not fs.exists(f"{root}/a.bin")
    with pytest.raises(FileNotFoundError):
        fs.cat_file(f"{root}/a.bin")
    with pytest.raises(FileNotFoundError):
        fs.rm_file(f"{root}/a.bin")
    with pytest.raises(FileNotFoundError):
        fs.ls(f"{root}/missing")


def test_exclusive_create_is_refused_the_second_time(fs: Any, root: str) -> None:
    fs.pipe_file(f"{root}/once", b"first", mode="create")
    with pytest.raises(FileExistsError) as caught:
        fs.pipe_file(f"{root}/once", b"second", mode="create")
    assert getattr(caught.value.__context__, "status_code", None) == 409
    assert getattr(caught.value.__context__, "error_code", None) == "BlobAlreadyExists"
    with pytest.raises(FileExistsError), fs.open(f"{root}/once", "xb") as f:  # refused at close (commit)
        f.write(b"third")
    assert fs.cat_file(f"{root}/once") == b"first"


def test_exclusive_create_race_has_one_winner(azure_server: servers.AzureServer, fs: Any, root: str) -> None:
    import adlfs

    path, writers = f"{root}/raced", 6
    outcome: list[str] = [""] * writers

    def own_fs(i: int) -> Any:
        return adlfs.AzureBlobFileSystem(skip_instance_cache=True, **servers.azure_storage_options(azure_server))

    def write(i: int, own: Any) -> None:
        try:
            own.pipe_file(path, b"%d" % i, mode="create")
            outcome[i] = "won"
        except FileExistsError:
            outcome[i] = "lost"

    assert run_together(writers, write, before=own_fs) == []
    assert sorted(outcome) == ["lost"] * (writers - 1) + ["won"]
    assert fs.cat_file(path) == b"%d" % outcome.index("won")


def test_staged_blocks_are_invisible_until_a_conditional_commit(fs: Any, root: str) -> None:
    from azure.core.exceptions import ResourceExistsError
    from azure.storage.blob import BlobBlock

    container, blob = root.split("/", 1)
    blob += "/staged"
    parts = [DATA[:8192], DATA[8192:]]

    async def stage() -> list[str]:
        async with fs.service_client.get_blob_client(container, blob) as bc:
            ids = [uuid.uuid4().hex for _ in parts]  # unique, all of one length
            for block_id, part in zip(ids, parts, strict=True):
                await bc.stage_block(block_id=block_id, data=part, length=len(part))
            return ids

    async def commit(ids: list[str]) -> None:
        async with fs.service_client.get_blob_client(container, blob) as bc:
            await bc.commit_block_list([BlobBlock(block_id=i) for i in ids], if_none_match="*")

    ids = sync(fs.loop, stage)
    fs.invalidate_cache()
    assert not fs.exists(f"{container}/{blob}")
    assert fs.find(root) == []
    with pytest.raises(FileNotFoundError):
        fs.cat_file(f"{container}/{blob}")

    sync(fs.loop, commit, ids)
    fs.invalidate_cache()
    assert fs.cat_file(f"{container}/{blob}") == DATA
    with pytest.raises(ResourceExistsError) as caught:
        sync(fs.loop, commit, sync(fs.loop, stage))
    assert caught.value.status_code == 409
    assert fs.cat_file(f"{container}/{blob}") == DATA


def test_az_and_abfs_urls_name_the_same_place(azure_server: servers.AzureServer, root: str) -> None:
    options = servers.azure_storage_options(azure_server)
    az, az_root = fsspec.core.url_to_fs(f"az://{root}/run", **options)
    abfs, abfs_root = fsspec.core.url_to_fs(f"abfs://{root}/run", **options)
    assert az_root == abfs_root == f"{root}/run"
    az.pipe_file(f"{az_root}/x", b"x")
    abfs.invalidate_cache()
    assert abfs.cat_file(f"{abfs_root}/x") == b"x"


def test_reset_deletes_every_container() -> None:
    with servers.AzuriteServer() as server:
        names = [server.create_container() for _ in range(2)]
        with server.client() as client:
            assert {c.name for c in client.list_containers()} >= set(names)
            server.reset()
            assert list(client.list_containers()) == []


def test_azurite_that_cannot_start_fails_with_its_log() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = servers.AzuriteServer(port=taken.getsockname()[1], timeout=30)
        with pytest.raises(RuntimeError, match=r"(?s)azurite failed to start \(exited.*EADDRINUSE"):
            server.start()
    assert server.workdir is None  # cleaned up
