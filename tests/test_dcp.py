"""bucketsnap.dcp: PyTorch Distributed Checkpoint's save and load, unchanged, through a bucketsnap run.

Multi-rank tests run real gloo ranks in subprocesses (tests/workers/dcp_worker.py, FSDP2 over a CPU device mesh),
on local disk and the S3 server (memory:// is per process); single-process tests run on memory, local and S3.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import threading
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from click.testing import CliRunner
from torch.distributed.checkpoint.api import CheckpointException

from bucketsnap import CorruptSnapshotError, SnapshotExistsError, SnapshotStore, StorageError, UnsafeLoadError
from bucketsnap._cli import cli
from bucketsnap.dcp import SnapshotReader, SnapshotWriter
from bucketsnap.retention import KeepLast
from conftest import Backend
from helpers import Worker

WORKER = str(Path(__file__).parent / "workers" / "dcp_worker.py")
#: Seconds the ranks of one run may take before they are killed (a loaded 2-core CI machine needs ~90 s).
DEADLINE = 300

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


@pytest.fixture(params=["memory", "local", "s3"])
def any_backend(request: pytest.FixtureRequest) -> Backend:
    return request.getfixturevalue(f"{request.param}_backend")  # type: ignore[no-any-return]


def trained() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.ReLU(), torch.nn.Linear(300, 3))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(8, 64)).sum().backward()
    opt.step()
    return model, opt


def state_of(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> dict[str, Any]:
    return {"model": model.state_dict(), "optim": opt.state_dict(), "step": step, "config": {"lr": 1e-3, "n": [1, 2]}}


def failure(exc: BaseException) -> BaseException:
    """The error a rank raised, out of DCP's CheckpointException."""
    assert isinstance(exc, CheckpointException), exc
    (err, _trace) = next(iter(exc.failures.values()))
    return err


# -- one process (no process group) ------------------------------------------------------------------------------


def test_save_and_load_without_a_process_group(any_backend: Backend) -> None:
    url = any_backend.url("dcp")
    model, opt = trained()
    dcp.save(state_of(model, opt, 5), storage_writer=SnapshotWriter(url, itr=5, storage_options=any_backend.options))
    fresh, fresh_opt = torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.ReLU(), torch.nn.Linear(300, 3)), None
    fresh_opt = torch.optim.Adam(fresh.parameters())
    fresh(torch.randn(8, 64)).sum().backward()
    fresh_opt.step()  # Adam's state exists, with other values
    out = {"model": fresh.state_dict(), "optim": fresh_opt.state_dict(), "step": 0, "config": {"lr": 0.0, "n": [0, 0]}}
    dcp.load(out, storage_reader=SnapshotReader(url, storage_options=any_backend.options))
    for key, value in model.state_dict().items():
        assert torch.equal(out["model"][key], value), key
    saved = opt.state_dict()["state"]
    for param, moments in saved.items():
        for name, value in moments.items():
            assert torch.equal(out["optim"]["state"][param][name], value), (param, name)
    assert out["step"] == 5 and out["config"] == {"lr": 1e-3, "n": [1, 2]}
    store = SnapshotStore(url, storage_options=any_backend.options)
    info = store.verify("last")  # every byte of every archive, against the checksums committed
    assert info.itr == 5 and not any(m.pickled for m in info.members.values())  # metadata and values: no pickle


def test_the_checkpoint_is_an_ordinary_snapshot(local_backend: Backend, tmp_path: Path) -> None:
    url = local_backend.url("ordinary")
    store = SnapshotStore(url, retention=KeepLast(1))
    model, opt = trained()
    for itr in (1, 2):
        dcp.save(state_of(model, opt, itr), storage_writer=SnapshotWriter(store, itr=itr, metrics={"loss": 0.5}))
    assert store.itrs() == [2]  # retention applied at the commit
    assert store.info(2).metrics == {"loss": 0.5}
    assert store.load(2, keys=["model.0.weight"])["model.0.weight"].equal(model.state_dict()["0.weight"])
    runner = CliRunner()
    for args in (["ls", url], ["show", url], ["verify", url], ["gc", url, "--min-age", "0"]):
        result = runner.invoke(cli, args, catch_exceptions=False)
        assert result.exit_code == 0, (args, result.output)
    objects = {f"snapshots/{name}" for name in store.storage.list("snapshots")}
    assert objects == set(store.info(2).objects())  # gc removed itr 1's archives, kept every one itr 2 needs
    copy = local_backend.url("copy")
    result = runner.invoke(cli, ["cp", url, copy], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = {"model": {k: torch.zeros_like(v) for k, v in model.state_dict().items()}}
    dcp.load(out, storage_reader=SnapshotReader(copy))  # located through the copy's own manifest
    assert all(torch.equal(out["model"][k], v) for k, v in model.state_dict().items())


def test_one_tensor_reads_that_tensors_bytes_and_the_metadata(s3_backend: Backend) -> None:
    url = s3_backend.url("one-tensor")
    state = {f"layer{i}": torch.randn(1024, 1024) for i in range(12)}  # 48 MiB in 12 tensors of 4 MiB
    dcp.save(state, storage_writer=SnapshotWriter(url, itr=1, storage_options=s3_backend.options))
    store = SnapshotStore(url, storage_options=s3_backend.options)
    out = {"layer7": torch.zeros(1024, 1024)}
    dcp.load(out, storage_reader=SnapshotReader(store))
    assert torch.equal(out["layer7"], state["layer7"])
    assert 4 * 2**20 <= store.storage.bytes_read <= 4 * 2**20 + 64 * 2**10


def test_a_save_that_fails_commits_nothing(memory_backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    store = memory_backend.store("fails")
    model, opt = trained()
    dcp.save(state_of(model, opt, 1), storage_writer=SnapshotWriter(store, itr=1))
    with pytest.raises(CheckpointException) as again:
        dcp.save(state_of(model, opt, 1), storage_writer=SnapshotWriter(store, itr=1))
    assert isinstance(failure(again.value), SnapshotExistsError)  # refused at the plan, before any write

    def broken(path: str, *args: Any, **kwargs: Any) -> Any:
        raise StorageError(f"{store.storage.url_of(path)}: injected failure")

    monkeypatch.setattr(store.storage, "write", broken)
    with pytest.raises(CheckpointException) as failed:
        dcp.save(state_of(model, opt, 2), storage_writer=SnapshotWriter(store, itr=2))
    assert isinstance(failure(failed.value), StorageError)
    monkeypatch.undo()
    assert store.itrs() == [1] and store.info("last").itr == 1


def test_async_save_returns_before_the_upload_and_its_future_reports_failure(
    memory_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = memory_backend.store("async")
    model, opt = trained()
    gate = threading.Event()
    real_write = store.storage.write

    @contextlib.contextmanager
    def gated(path: str, *args: Any, **kwargs: Any) -> Iterator[Any]:
        assert gate.wait(60)
        with real_write(path, *args, **kwargs) as f:
            yield f

    monkeypatch.setattr(store.storage, "write", gated)
    future = dcp.async_save(state_of(model, opt, 1), storage_writer=SnapshotWriter(store, itr=1))
    assert not future.done() and store.itrs() == []  # the upload waits for the gate: async_save did not
    gate.set()
    future.result(timeout=60)
    assert store.itrs() == [1]

    def broken(path: str, *args: Any, **kwargs: Any) -> Any:
        raise StorageError(f"{store.storage.url_of(path)}: injected upload failure")

    monkeypatch.setattr(store.storage, "write", broken)
    future = dcp.async_save(state_of(model, opt, 2), storage_writer=SnapshotWriter(store, itr=2))
    with pytest.raises(CheckpointException) as failed:
        future.result(timeout=60)
    assert isinstance(failure(failed.value), StorageError)
    assert store.itrs() == [1]


class Opaque:
    def __init__(self, x: int) -> None:
        self.x = x

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Opaque) and other.x == self.x


def test_values_without_a_safe_encoding_need_allow_pickle(memory_backend: Backend) -> None:
    url = memory_backend.url("pickle")
    dcp.save({"w": torch.ones(3), "opaque": Opaque(4)}, storage_writer=SnapshotWriter(url, itr=1))
    info = SnapshotStore(url).info()
    assert [k for k, m in info.members.items() if m.pickled] == ["opaque"]
    with pytest.raises(CheckpointException) as refused:
        dcp.load({"w": torch.zeros(3), "opaque": None}, storage_reader=SnapshotReader(url))
    assert isinstance(failure(refused.value), UnsafeLoadError)
    out: dict[str, Any] = {"w": torch.zeros(3), "opaque": None}
    dcp.load(out, storage_reader=SnapshotReader(url, allow_pickle=True))
    assert out["opaque"] == Opaque(4) and torch.equal(out["w"], torch.ones(3))


def test_the_reader_says_what_it_cannot_read(memory_backend: Backend) -> None:
    store = memory_backend.store("plain")
    with pytest.raises(CheckpointException, match=r"no committed snapshot at .*the run is empty"):
        dcp.load({"w": torch.zeros(1)}, storage_reader=SnapshotReader(store))
    store.save(1, {"w": torch.zeros(1)})
    with pytest.raises(CheckpointException, match=r"not saved by bucketsnap\.dcp\.SnapshotWriter"):
        dcp.load({"w": torch.zeros(1)}, storage_reader=SnapshotReader(store))
    with pytest.raises(ValueError, match="checkpoint_id"):
        dcp.save({"w": torch.zeros(1)}, checkpoint_id="/tmp/x", storage_writer=SnapshotWriter(store, itr=2))


def test_a_whole_tensor_read_is_checked_against_its_crc(local_backend: Backend) -> None:
    url = local_backend.url("crc")
    state = {"w": torch.randn(600, 300), "half": torch.randn(40, 7).to(torch.bfloat16)}  # w: 6 blocks
    dcp.save(state, storage_writer=SnapshotWriter(url, itr=1))
    out = {k: torch.zeros_like(v) for k, v in state.items()}
    dcp.load(out, storage_reader=SnapshotReader(url))
    assert all(torch.equal(out[k], state[k]) for k in state)
    member = SnapshotStore(url).info().members["w"]
    assert member.path is not None
    archive = Path(url) / member.path
    data = bytearray(archive.read_bytes())
    data[member.offset + member.stored_size // 2] ^= 0x01
    archive.write_bytes(bytes(data))
    with pytest.raises(CheckpointException) as corrupt:
        dcp.load({"w": torch.zeros(600, 300)}, storage_reader=SnapshotReader(url))
    assert isinstance(failure(corrupt.value), CorruptSnapshotError)
    assert "checksum mismatch" in str(failure(corrupt.value))


@pytest.mark.parametrize(
    ("offsets", "lengths"),
    [
        ((0, 0, 0), (40, 30, 70)),  # whole: read with its header bytes, CRC-checked
        ((13, 0, 0), (9, 30, 70)),  # a block of rows across 128 KiB blocks: exactly its bytes
        ((39, 0, 0), (1, 30, 70)),  # the last row
        ((5, 7, 0), (20, 3, 70)),  # a shard of dimension 1: the enclosing range, then strided
        ((1, 2, 3), (2, 2, 2)),
    ],
)
def test_a_part_of_a_stored_tensor_reads_only_its_range(
    offsets: tuple[int, ...], lengths: tuple[int, ...], memory_backend: Backend
) -> None:
    from bucketsnap._dcp_format import read_tensor, write_items

    storage = memory_backend.store("part").storage
    tensor = torch.randn(40, 30, 70, dtype=torch.float64)  # 672 000 bytes: six 128 KiB blocks
    written = write_items(storage, "snapshots/part.zip", [("t", tensor)], {})
    item = written.items["t"]
    before = storage.bytes_read
    part = read_tensor(lambda a, b: storage.read("snapshots/part.zip", a, b), item, offsets, lengths, where="t")
    expected = tensor[tuple(slice(o, o + n) for o, n in zip(offsets, lengths, strict=True))]
    assert torch.equal(part, expected)
    first = sum(o * s for o, s in zip(offsets, tensor.stride(), strict=True))
    last = sum((o + n - 1) * s for o, n, s in zip(offsets, lengths, tensor.stride(), strict=True))
    span = (last + 1 - first) * tensor.element_size()
    blocks = span // (128 * 1024) + 2
    assert span <= storage.bytes_read - before <= span + 3 * blocks + (item.data_start or 0) + 32


# -- real ranks --------------------------------------------------------------------------------------------------


def run_ranks(scenario: str, world: int, backend: Backend, url: str, tmp_path: Path) -> list[dict[str, Any]]:
    """Run ``world`` ranks of ``scenario``; return each rank's events (and exit code as event "exit")."""
    init = tmp_path / f"init-{uuid.uuid4().hex}"
    reference = str(tmp_path / "reference.pt")
    logs = tmp_path / f"logs-{uuid.uuid4().hex[:8]}"
    logs.mkdir()
    procs: list[Worker] = []
    argv = [scenario, "", str(world), str(init), url, json.dumps(backend.options), reference]
    try:
        for rank in range(world):
            argv[1] = str(rank)
            procs.append(Worker(WORKER, argv, logs / f"{rank}.out", logs / f"{rank}.err"))
        for proc in procs:
            proc.wait(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        tails = [
            (logs / f"{r}.out").read_text()[-1500:] + (logs / f"{r}.err").read_text()[-1500:] for r in range(world)
        ]
        pytest.fail(f"{scenario}: a rank still ran after {DEADLINE} s: {tails}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    ranks = []
    for rank, proc in enumerate(procs):
        lines = (logs / f"{rank}.out").read_text().splitlines()
        events = [json.loads(line) for line in lines if line.startswith("{")]
        crashed = [e for e in events if e["event"] == "crashed"]
        assert not crashed, f"rank {rank} crashed: {crashed[0]['traceback']}"
        assert proc.returncode in (0, -signal.SIGKILL), (logs / f"{rank}.err").read_text()[-3000:]
        ranks.append({e["event"]: e for e in events} | {"exit": proc.returncode})
    return ranks


@pytest.fixture(scope="module")
def fsdp_run(s3_backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[dict[str, Any]]]:
    """One run of the worker's roundtrip (3 gloo ranks: save at 2, load at 3, 2 and 1, a rank killed mid-save)."""
    url = s3_backend.url("fsdp")
    return url, run_ranks("roundtrip", 3, s3_backend, url, tmp_path_factory.mktemp("fsdp"))


def test_fsdp2_saved_by_2_ranks_loads_exactly_at_1_2_and_3_ranks(
    fsdp_run: tuple[str, list[dict[str, Any]]], s3_backend: Backend
) -> None:
    url, ranks = fsdp_run
    assert [r["saved"]["itr"] for r in ranks[:2]] == [7, 7] and "saved" not in ranks[2]
    for world in (3, 2, 1):
        for rank, r in enumerate(ranks[:world]):
            loaded = r[f"loaded{world}"]
            assert loaded["step"] == 7 and loaded["tag"] == "fsdp-2", (world, rank)
            if rank == 0:
                assert loaded["differs"] is None, (world, loaded["differs"])  # every tensor equal to the saved one
            # each rank reads its own rows of each tensor, the scalars and the metadata, and nothing else
            assert loaded["local_bytes"] <= loaded["bytes_read"] <= loaded["local_bytes"] + 64 * 2**10, (world, rank)
    info = SnapshotStore(url, storage_options=s3_backend.options).verify(7)
    archives = {m.path or info.path for m in info.members.values()}
    assert len(archives) == 3 and info.path in archives  # one archive per rank, and the metadata's own


def test_a_rank_killed_mid_save_leaves_last_unchanged(
    fsdp_run: tuple[str, list[dict[str, Any]]], s3_backend: Backend
) -> None:
    url, ranks = fsdp_run
    assert ranks[1]["exit"] == -signal.SIGKILL and "error" in ranks[0] and ranks[2]["exit"] == 0
    store = SnapshotStore(url, storage_options=s3_backend.options)
    assert store.itrs() == [7] and store.verify("last").itr == 7
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = {"step": 0}
        dcp.load(out, storage_reader=SnapshotReader(store))
    assert out["step"] == 7
