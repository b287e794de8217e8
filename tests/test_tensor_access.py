"""Snapshot.tensor: one tensor (or rows of it) of a member, reading only the frames that hold it.

docs/api.md: "Only the frames holding the value are downloaded and decompressed, each checked against its CRC-32,
after one read of at most 64 KiB for the member's frame index and one of its header"; docs/format.md's
"Seekable members" section. Bytes are counted by the run's Storage (every ranged read), on memory and on the
S3 server.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from click.testing import CliRunner

from bucketsnap import CorruptSnapshotError, SnapshotStore
from bucketsnap._cli import cli
from bucketsnap._frames import FRAME_SIZE
from conftest import Backend

KiB = 1024


def _policy(n: int, size: int, generator: torch.Generator) -> OrderedDict[str, torch.Tensor]:
    return OrderedDict((f"actor.{i}.weight", torch.randn(size, generator=generator)) for i in range(n))


@pytest.fixture(params=["memory", "s3"])
def run(request: pytest.FixtureRequest) -> Backend:
    if request.param == "s3":
        request.applymarker(pytest.mark.s3)
    return request.getfixturevalue(f"{request.param}_backend")  # type: ignore[no-any-return]


def _read(store: SnapshotStore, fn: Any) -> tuple[Any, int]:
    store.storage.bytes_read = 0
    value = fn()
    return value, store.storage.bytes_read


def test_one_tensor_of_a_large_raw_member_reads_that_tensors_bytes_and_at_most_64_kib_more(run: Backend) -> None:
    policy = _policy(16, 1_000_000, torch.Generator().manual_seed(0))  # 16 x 4 MB of float32: stored raw
    store = run.store()
    store.save(1, {"policy": policy, "step": 3})
    snap = store.open()
    assert snap.info.members["policy"].ratio < 1.001
    for key in ("actor.7.weight", "actor.0.weight", "actor.15.weight"):
        snap = store.open()  # a fresh view: the frame index and header are read again
        value, read = _read(store, lambda: snap.tensor("policy", key))  # noqa: B023
        assert torch.equal(value, policy[key]) and value.dtype == torch.float32
        nbytes = policy[key].nbytes
        assert nbytes <= read <= nbytes + 64 * KiB, f"read {read} bytes for a tensor of {nbytes}"
    again, read = _read(store, lambda: snap.tensor("policy", "actor.3.weight"))
    assert torch.equal(again, policy["actor.3.weight"])
    assert read <= policy["actor.3.weight"].nbytes + 4 * KiB, "the index and header are kept by the Snapshot"


def test_one_tensor_of_a_compressed_member_reads_only_the_frames_that_hold_it(run: Backend) -> None:
    rng = np.random.default_rng(1)
    frames = {f"env{i}": (rng.random((400, 84, 84)) < 0.02).astype(np.uint8) * 200 for i in range(6)}  # 17 MB
    store = run.store()
    store.save(1, {"obs": frames})
    snap = store.open()
    member = snap.info.members["obs"]
    assert member.ratio > 5, "compressible: stored in compressed frames"
    value, read = _read(store, lambda: snap.tensor("obs", "env4"))
    assert np.array_equal(value, frames["env4"]) and value.dtype == np.uint8
    layout = snap._layouts["obs"]
    loc = layout.values["env4"]
    held = sum(layout.index.stored_sizes[i] for i in layout.index.frames(loc.start, loc.end))
    assert read <= held + 64 * KiB
    assert read < member.stored_size / 4, f"read {read} of the member's {member.stored_size} stored bytes"


@pytest.mark.parametrize("compressible", [False, True], ids=["raw", "compressed"])
def test_rows_of_a_tensor_read_the_frames_overlapping_them(compressible: bool) -> None:
    big = torch.randn(4000, 1000) if not compressible else torch.randint(0, 3, (4000, 1000)).float()
    store = SnapshotStore("memory://rows/run")
    store.save(1, {"table": {"emb": big, "bias": torch.randn(10), "n": 5}})
    snap = store.open()
    snap.tensor("table", "bias")  # the index and header, read once
    for rows in [slice(1000, 1100), slice(None), slice(3990, None), slice(-5, None), slice(0, 0), slice(5, 5000)]:
        value, read = _read(store, lambda: snap.tensor("table", "emb", rows=rows))  # noqa: B023
        assert torch.equal(value, big[rows]) and value.is_contiguous()
        assert read <= big[rows].nbytes + 2 * (FRAME_SIZE + 64) + 64 * KiB
    value, read = _read(store, lambda: snap.tensor("table", "emb", rows=slice(100, 200)))
    assert read <= 100 * 4000 + 2 * FRAME_SIZE + 4 * KiB, "frames before and after the rows are not read"
    assert torch.equal(snap.tensor("table", "emb", rows=slice(1, 40, 7)), big[1:40:7])
    with pytest.raises(TypeError, match="rows="):
        snap.tensor("table", "n", rows=slice(None))
    with pytest.raises(ValueError, match="step"):
        snap.tensor("table", "emb", rows=slice(None, None, -1))


def _torch_dtypes() -> list[torch.dtype]:
    names = ["float16", "bfloat16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64", "bool"]
    names += ["complex64", "complex128", "float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64"]
    return [getattr(torch, n) for n in names if hasattr(torch, n)]


@pytest.mark.parametrize("dtype", _torch_dtypes(), ids=str)
def test_every_torch_dtype_comes_back_as_a_whole_load_gives_it(dtype: torch.dtype) -> None:
    base = torch.randn(300, 70) * 50
    value = base.to(dtype) if dtype.is_floating_point or dtype.is_complex else base.to(torch.int64).to(dtype)
    store = SnapshotStore("memory://dtypes/run")
    store.save(1, {"m": {"x": value, "p": torch.nn.Parameter(torch.ones(3, dtype=torch.float32))}})
    snap = store.open()
    whole = snap["m"]["x"]
    one = snap.tensor("m", "x")
    assert one.dtype == dtype == whole.dtype and one.shape == whole.shape
    assert torch.equal(one.view(torch.uint8), whole.view(torch.uint8))  # byte for byte (NaNs of float8 too)
    assert torch.equal(snap.tensor("m", "x", rows=slice(7, 9)).view(torch.uint8), whole[7:9].view(torch.uint8))
    param = snap.tensor("m", "p")
    assert isinstance(param, torch.nn.Parameter) and param.requires_grad


@pytest.mark.parametrize(
    "array",
    [
        np.arange(24, dtype=np.float16).reshape(4, 6),
        np.arange(24, dtype=">i4").reshape(6, 4),
        np.array([True, False, True]),
        np.arange(6, dtype=np.complex128),
        np.array(["2026-12-01", "1970-01-01"], dtype="datetime64[D]"),
        np.zeros(5, dtype=[("a", "<i4"), ("b", "<f8", (2,))]),
        np.float32(2.5),
        np.zeros((0, 3)),
    ],
    ids=lambda a: str(getattr(a, "dtype", type(a).__name__)),
)
def test_numpy_arrays_and_scalars_come_back_as_a_whole_load_gives_them(array: Any) -> None:
    store = SnapshotStore("memory://arrays/run")
    store.save(1, {"m": {"a": array}})
    snap = store.open()
    whole, one = snap["m"]["a"], snap.tensor("m", "a")
    assert type(one) is type(whole) and one.dtype == whole.dtype and np.shape(one) == np.shape(whole)
    assert np.asarray(one).tobytes() == np.asarray(whole).tobytes()


def test_nested_paths_plain_values_and_the_whole_member() -> None:
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    state = {"opt": opt.state_dict(), "w": torch.randn(5, 5), "nested": {"a": [torch.ones(2), {"b": (1, "x")}]}}
    store = SnapshotStore("memory://paths/run")
    store.save(1, state)
    snap = store.open()
    assert torch.equal(snap.tensor("opt", "state/0/exp_avg"), opt.state_dict()["state"][0]["exp_avg"])
    assert snap.tensor("opt", "param_groups/0/lr") == opt.state_dict()["param_groups"][0]["lr"]
    assert snap.tensor("opt", "param_groups/0/params") == [0, 1]
    assert torch.equal(snap.tensor("w"), state["w"])  # key "": the member's value itself
    assert torch.equal(snap.tensor("nested", "a/0"), torch.ones(2))
    assert snap.tensor("nested", "a/1/b") == (1, "x")
    with pytest.raises(KeyError, match=r"no value at 'state/9/exp_avg'; it has 'state/0/step', "):
        snap.tensor("opt", "state/9/exp_avg")
    with pytest.raises(KeyError, match="no key 'nope'"):
        snap.tensor("nope", "x")


def test_pickled_values_still_need_allow_pickle() -> None:
    from bucketsnap import UnsafeLoadError

    store = SnapshotStore("memory://pickled/run")
    store.save(1, {"m": {"w": torch.ones(3), "f": {1, 2}}})
    assert torch.equal(store.open().tensor("m", "w"), torch.ones(3))  # the tensor beside it needs no unpickling
    with pytest.raises(UnsafeLoadError):
        store.open().tensor("m", "f")
    assert store.open(allow_pickle=True).tensor("m", "f") == {1, 2}


@pytest.mark.parametrize("compressible", [False, True], ids=["raw", "compressed"])
def test_old_single_frame_members_stay_readable_and_are_read_whole(
    compressible: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Archives written before seekable members: one zstd frame per member (codec "zstd")."""
    policy = _policy(4, 300_000, torch.Generator().manual_seed(2))
    if compressible:
        policy = OrderedDict((k, v.round()) for k, v in policy.items())
        policy["actor.0.weight"].zero_()
    store = SnapshotStore("memory://old/run")
    monkeypatch.setattr("bucketsnap._archive.WRITE_CODEC", "zstd")
    store.save(1, {"policy": policy})
    monkeypatch.undo()
    snap = store.open()
    member = snap.info.members["policy"]
    assert member.codec == "zstd"
    assert all(torch.equal(snap["policy"][k], v) for k, v in policy.items())
    value, read = _read(store, lambda: snap.tensor("policy", "actor.2.weight"))
    assert torch.equal(value, policy["actor.2.weight"])
    assert read == member.stored_size, "an old member is read whole (and its checksum checked)"
    assert torch.equal(snap.tensor("policy", "actor.1.weight", rows=slice(10, 20)), policy["actor.1.weight"][10:20])
    store.verify(1)
    store.save(2, {"policy": policy})  # new snapshots of the same run are seekable
    assert store.info(2).members["policy"].codec == "zstd-frames"


def _flip(store: SnapshotStore, position: int) -> None:
    path = store.storage.path(store.info(1).path)
    data = bytearray(store.storage.fs.cat_file(path))
    data[position] ^= 0x40
    store.storage.fs.pipe_file(path, bytes(data))


@pytest.mark.parametrize("compressible", [False, True], ids=["raw", "compressed"])
def test_a_corrupted_frame_is_detected_and_other_tensors_stay_readable(compressible: bool) -> None:
    make = (lambda: torch.zeros(600_000)) if compressible else (lambda: torch.randn(600_000))
    policy = {"a": make(), "b": make(), "c": make()}
    if compressible:
        for i, t in enumerate(policy.values()):
            t[::100] = i + 1
    store = SnapshotStore("memory://flip/run")
    store.save(1, {"policy": policy})
    snap = store.open()
    snap.tensor("policy", "a")
    layout = snap._layouts["policy"]
    loc = layout.values["b"]
    frame = layout.index.frames(loc.start, loc.end)[1]
    _flip(store, snap.info.members["policy"].offset + layout.index.stored_starts[frame] + 40)
    with pytest.raises(CorruptSnapshotError, match=rf"policy.zst frame {frame}: checksum mismatch"):
        store.open().tensor("policy", "b")
    with pytest.raises(CorruptSnapshotError, match=r"checksum|corrupt"):
        store.open()["policy"]  # a whole load checks the member's CRC-32
    assert torch.equal(store.open().tensor("policy", "a"), policy["a"])  # its frames are intact
    assert torch.equal(store.open().tensor("policy", "c"), policy["c"])
    with pytest.raises(CorruptSnapshotError):
        store.verify(1)


def test_a_frame_index_that_lies_is_refused() -> None:
    store = SnapshotStore("memory://index/run")
    store.save(1, {"policy": {"w": torch.randn(400_000)}})
    member = store.info(1).members["policy"]
    _flip(store, member.offset + member.stored_size - 8)  # the frame count in the index's footer
    with pytest.raises(CorruptSnapshotError, match="frame index"):
        store.open().tensor("policy", "w")
    _flip(store, member.offset + member.stored_size - 8)
    _flip(store, member.offset + member.stored_size - 10)  # the last frame's CRC-32 in the index
    with pytest.raises(CorruptSnapshotError, match=r"policy.zst: checksum mismatch \(crc32 \w+ of the frame index"):
        store.open().tensor("policy", "w")


def test_a_partial_read_checks_the_frame_index_against_the_members_crc() -> None:
    """A read of one tensor checks the whole index, not only the entries of the frames it reads: an index that
    lies about frames the read never touches is refused as well (a review found only whole reads checked it)."""
    store = SnapshotStore("memory://index-partial/run")
    store.save(1, {"policy": {"a": torch.randn(400_000), "c": torch.randn(400_000)}})
    member = store.info(1).members["policy"]
    assert torch.equal(store.open().tensor("policy", "a")[:3], store.load()["policy"]["a"][:3])
    _flip(store, member.offset + member.stored_size - 10)  # the last frame's CRC-32 in the index: one of "c"'s
    with pytest.raises(CorruptSnapshotError, match=r"policy.zst: checksum mismatch \(crc32 \w+ of the frame index"):
        store.open().tensor("policy", "a")


def test_threaded_compression_writes_the_same_values() -> None:
    obs = {f"o{i}": torch.randint(0, 4, (500, 1000), dtype=torch.uint8) for i in range(5)}
    store = SnapshotStore("memory://threads/run", compression_threads=2)
    store.save(1, {"obs": obs})
    snap = store.open()
    assert snap.info.members["obs"].ratio > 2
    assert all(torch.equal(snap.tensor("obs", k), v) for k, v in obs.items())
    assert all(torch.equal(snap["obs"][k], v) for k, v in obs.items())
    store.verify(1)


def test_cli_restore_key_writes_one_tensor(tmp_path: Path) -> None:
    policy = _policy(3, 200_000, torch.Generator().manual_seed(3))
    run = str(tmp_path / "run")
    SnapshotStore(run).save(1, {"policy": policy, "opt": {"x": torch.ones(2)}})
    out = tmp_path / "w.pt"
    result = CliRunner().invoke(cli, ["restore", run, "--key", "policy/actor.0.weight", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert torch.equal(torch.load(out, weights_only=True), policy["actor.0.weight"])
    st = tmp_path / "w.safetensors"
    result = CliRunner().invoke(cli, ["restore", run, "-k", "policy/actor.2.weight", "-o", str(st)])
    assert result.exit_code == 0, result.output
    assert torch.equal(safetensors.torch.load_file(st)["policy/actor.2.weight"], policy["actor.2.weight"])
    result = CliRunner().invoke(cli, ["restore", run, "--key", "policy/actor.9.weight", "-o", str(out)])
    assert result.exit_code == 3 and "no value at 'actor.9.weight'" in result.output
