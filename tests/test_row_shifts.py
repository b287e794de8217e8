"""Rows repeating another field's next row, stored once (``.shift.zst`` chunks, docs/format.md "Shifted-rows
chunks"): restores rebuild exactly the rows saved, ids stay the hash of the raw rows, the repeated rows are not
stored, and a lying object is refused, never decoded into wrong rows or outside its buffers."""

from __future__ import annotations

import io
import struct
import uuid
from pathlib import Path
from typing import Any

import gymnasium
import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from stable_baselines3.common.buffers import DictReplayBuffer, ReplayBuffer

from bucketsnap import CorruptSnapshotError, SnapshotStore, _chunks, _row_shifts
from bucketsnap._chunks import ChunkedArrays, ChunkTable, read_chunks
from bucketsnap.buffers import buffer_state, restore_buffer


def shifted_pair(
    rows: int, row_shape: tuple[int, ...], ended: list[int], seed: int, *, sparse: bool = False
) -> dict[str, np.ndarray]:
    """``obs`` and ``next`` where ``next[t]`` is ``obs[t + 1]`` but at the rows ``ended`` (and the last); random
    bytes, or (``sparse``) zeros but for 8 random bytes a row, which compress to little."""
    rng = np.random.default_rng(seed)

    def random_rows(n: int) -> np.ndarray:
        if not sparse:
            return rng.integers(0, 255, (n, *row_shape), dtype=np.uint8)
        out = np.zeros((n, int(np.prod(row_shape))), np.uint8)
        out[:, :8] = rng.integers(1, 255, (n, 8), dtype=np.uint8)
        return out.reshape(n, *row_shape)

    obs = random_rows(rows)
    nxt = np.empty_like(obs)
    nxt[:-1] = obs[1:]
    nxt[-1] = random_rows(1)[0]
    for t in ended:
        nxt[t % rows] = random_rows(1)[0]
    return {"obs": obs, "next": nxt, "act": rng.integers(0, 6, (rows, 1))}


def save_and_read(url: str, arrays: dict[str, np.ndarray], chunk_rows: int, shifted: dict[str, str]) -> Any:
    store = SnapshotStore(url)
    rows = len(arrays["obs"])
    store.save(1, {"b": ChunkedArrays(arrays, rows, kind="t", chunk_rows=chunk_rows, shifted=shifted)})
    table = ChunkTable.parse(store.load(1)["b"], url)
    out = {name: np.zeros_like(a) for name, a in arrays.items()}
    for _ in read_chunks(store.storage, table, where=url, into=out, verify=True):
        pass
    return table, out


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 60),
    chunk_rows=st.integers(1, 25),
    width=st.sampled_from([(4096,), (4101,), (2, 2048), (3, 40), (8192,)]),
    ended=st.lists(st.integers(0, 59), max_size=12),
    seed=st.integers(0, 2**16),
)
def test_shifted_rows_come_back_exact_and_unchanged_rows_are_never_stored_twice(
    rows: int, chunk_rows: int, width: tuple[int, ...], ended: list[int], seed: int
) -> None:
    """Rows of 4 KiB or more are stored shifted (smaller ones as they are); a second save of the same rows, by
    hash or by ring, finds every chunk stored: the ids a lookup computes are those a save writes."""
    arrays = shifted_pair(rows, width, ended, seed, sparse=True)
    url = f"memory://shifts/{uuid.uuid4().hex}"
    table, out = save_and_read(url, arrays, chunk_rows, {"next": "obs"})
    for name, array in arrays.items():
        np.testing.assert_array_equal(out[name], array, err_msg=name)
    big = int(np.prod(width)) >= _row_shifts.MIN_ROW_BYTES
    assert all(c["path"].endswith(".shift.zst") == (big and c["rows"] > 1) for c in table.chunks)
    store = SnapshotStore(url)
    again = ChunkedArrays(arrays, rows, kind="t", chunk_rows=chunk_rows, shifted={"next": "obs"})
    store.save(2, {"b": again})
    assert set(store.info(2).refs) == set(store.info(1).refs) and again.hashed == len(table.chunks)


def test_repeated_rows_are_not_stored_again() -> None:
    """A field apart by more than zstd's window, so that only the shift can find the repeat: random rows, which
    zstd cannot shrink, take about one field's bytes, not two."""
    arrays = shifted_pair(1024, (4096,), ended=[100, 700], seed=1)  # 4 MiB per field, one chunk
    table, out = save_and_read("memory://shifts/size/run", arrays, 1024, {"next": "obs"})
    plain, _ = save_and_read("memory://shifts/size/plain", arrays, 1024, {})
    field = arrays["obs"].nbytes
    assert table.chunks[0]["stored_size"] < field + 4 * 4096 + 1024  # obs, 3 literal rows, records, act
    assert plain.chunks[0]["stored_size"] > 1.9 * field
    np.testing.assert_array_equal(out["next"], arrays["next"])


def test_sb3_buffers_store_next_observations_as_shifted_rows() -> None:
    space = gymnasium.spaces.Box(0, 255, (32, 64), np.uint8)  # 2 KiB: 4 KiB a row of 2 envs
    plain = ReplayBuffer(64, space, gymnasium.spaces.Discrete(2), device="cpu", n_envs=2)
    spaces = gymnasium.spaces.Dict({"img": space, "vec": gymnasium.spaces.Box(-1, 1, (3,), np.float32)})
    dict_buffer = DictReplayBuffer(64, spaces, gymnasium.spaces.Discrete(2), device="cpu", n_envs=2)
    rng = np.random.default_rng(0)
    for buffer in (plain, dict_buffer):
        obs = spaces.sample() if buffer is dict_buffer else space.sample()
        for t in range(80):  # wraps around: pos 16
            nxt = spaces.sample() if buffer is dict_buffer else space.sample()
            two = (lambda o: {k: np.stack([v, v]) for k, v in o.items()}) if buffer is dict_buffer else np.stack
            done = np.array([t % 9 == 0, False])
            buffer.add(two(obs) if buffer is dict_buffer else two([obs, obs]),
                       two(nxt) if buffer is dict_buffer else two([nxt, nxt]),
                       rng.integers(0, 2, (2, 1)), np.ones(2), done, [{}, {}])  # fmt: skip
            obs = nxt
        store = SnapshotStore(f"memory://shifts/sb3-{type(buffer).__name__}/run")
        store.save(1, {"replay_buffer": buffer_state(buffer, chunk_rows=20)})
        table = store.load(1)["replay_buffer"]
        assert table["format"] == "bucketsnap.chunked/3"
        assert all(c["path"].endswith(".shift.zst") for c in table["chunks"])
        fresh = type(buffer)(64, buffer.observation_space, buffer.action_space, device="cpu", n_envs=2)
        restore_buffer(store, fresh, verify=True)
        for name in ("observations", "next_observations"):
            mine, theirs = getattr(fresh, name), getattr(buffer, name)
            for key in mine if isinstance(mine, dict) else [None]:
                a, b = (mine[key], theirs[key]) if key else (mine, theirs)
                np.testing.assert_array_equal(a, b, err_msg=f"{name} {key}")
        assert (fresh.pos, fresh.full) == (buffer.pos, buffer.full)


def test_a_source_row_written_during_the_save_is_never_taken_for_the_next_row(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """docs/buffers.md: whatever writes the arrays meanwhile, a chunk holds what its id names. Here another
    writer makes ``obs[6]`` equal ``next[5]`` after ``obs`` was copied and before ``next`` is compared: a save
    comparing against the live rows would record ``next[5]`` as a repeat of the ``obs[6]`` it stored, which
    differs."""
    arrays = shifted_pair(32, (4096,), ended=[5], seed=3)
    held_next5 = arrays["next"][5].copy()
    add = _row_shifts.RegionWriter.add

    def writer_meanwhile(self: _row_shifts.RegionWriter, block: memoryview) -> None:
        arrays["obs"][6] = held_next5
        add(self, block)

    with monkeypatch.context() as patch:
        patch.setattr(_row_shifts.RegionWriter, "add", writer_meanwhile)
        store = SnapshotStore("memory://shifts/race/run")
        store.save(1, {"b": ChunkedArrays(arrays, 32, kind="t", chunk_rows=32, shifted={"next": "obs"})})
    table = ChunkTable.parse(store.load(1)["b"], "race")
    out = {name: np.zeros_like(a) for name, a in arrays.items()}
    for _ in read_chunks(store.storage, table, where="race", into=out, verify=True):  # content matches its id
        pass
    np.testing.assert_array_equal(out["next"][5], held_next5)


@pytest.mark.parametrize(
    ("target", "source", "message"),
    [("next", "nope", "do not have"), ("obs", "next", "earlier field"), ("act", "obs", "same dtype")],
)
def test_a_shift_between_fields_that_cannot_repeat_is_refused(target: str, source: str, message: str) -> None:
    arrays = shifted_pair(4, (4096,), [], 0)
    with pytest.raises(ValueError, match=message):
        ChunkedArrays(arrays, 4, kind="t", shifted={target: source})


# -- lying objects ---------------------------------------------------------------------------------------------


def body_of(arrays: dict[str, np.ndarray], tmp_path: Path) -> tuple[SnapshotStore, ChunkTable, Path, bytes]:
    store = SnapshotStore(str(tmp_path / "run"))
    store.save(1, {"b": ChunkedArrays(arrays, 8, kind="t", chunk_rows=8, shifted={"next": "obs"})})
    table = ChunkTable.parse(store.load(1)["b"], "lies")
    path = tmp_path / "run" / table.chunks[0]["path"]
    return store, table, path, zstandard.ZstdDecompressor().stream_reader(io.BytesIO(path.read_bytes())).read()


def rewritten(path: Path, body: bytes) -> None:
    """The object holding ``body`` instead (a valid zstd frame and checksum: only the structure lies)."""
    params = zstandard.ZstdCompressionParameters.from_level(1, write_checksum=1)
    path.write_bytes(zstandard.ZstdCompressor(compression_params=params).compress(body))


ROW = 4096  # bytes per row of obs and next, below
HEAD = 12 + 32  # magic, count, one region
FIELD = 8 * ROW  # obs's bytes: next's region starts there


def lies() -> dict[str, Any]:
    """Name -> how to turn a valid body (obs 8 rows of 4 bytes, next repeating it but rows 2 and 7, act) into a
    lying one."""
    region = struct.Struct("<4Q")

    def header(source: int, target: int, row_bytes: int, rows: int, count: int = 1) -> bytes:
        return b"BSSHIFT1" + struct.pack("<I", count) + region.pack(source, target, row_bytes, rows)

    return {
        "magic": lambda b: b"XSSHIFT1" + b[8:],
        "no region": lambda b: b"BSSHIFT1" + struct.pack("<I", 0) + b[12:],
        "too many regions": lambda b: b"BSSHIFT1" + struct.pack("<I", 2**31) + b[12:],
        "region past the chunk": lambda b: header(0, FIELD, ROW, 10**6) + b[HEAD:],
        "source after target": lambda b: header(FIELD + ROW, FIELD, ROW, 8) + b[HEAD:],
        "source overlapping target": lambda b: header(ROW, FIELD, ROW, 8) + b[HEAD:],
        "zero rows": lambda b: header(0, FIELD, ROW, 0) + b[HEAD:],
        "rows of one byte": lambda b: header(0, FIELD, 1, 8 * ROW) + b[HEAD:],
        "not a whole field": lambda b: header(0, FIELD, ROW, 7) + b[HEAD:],
        "zero record": lambda b: b[: HEAD + FIELD] + struct.pack("<Q", 0) + b[HEAD + FIELD + 8 :],
        "record past the region": lambda b: b[: HEAD + FIELD] + struct.pack("<Q", 99 << 1) + b[HEAD + FIELD + 8 :],
        "repeat of the last row": lambda b: b[: HEAD + FIELD] + struct.pack("<Q", 8 << 1) + b[HEAD + FIELD + 8 :],
        "cut short": lambda b: b[: len(b) - 3],
        "bytes after the end": lambda b: b + b"\0",
        "cut in the header": lambda b: b[:20],
    }


@pytest.mark.parametrize("lie", sorted(lies()))
def test_a_shifted_chunk_whose_structure_lies_is_refused(lie: str, tmp_path: Path) -> None:
    arrays = shifted_pair(8, (ROW,), ended=[2], seed=5, sparse=True)
    store, table, path, body = body_of(arrays, tmp_path)
    assert body[HEAD + FIELD : HEAD + FIELD + 8] == struct.pack("<Q", 2 << 1)  # after obs: a repeat of rows 0-1
    rewritten(path, lies()[lie](body))
    guard = 64
    out = {
        name: np.zeros((len(a) + 2 * guard // max(1, a[0].nbytes), *a.shape[1:]), a.dtype) for name, a in arrays.items()
    }
    inner = {name: out[name][guard // max(1, a[0].nbytes) :][: len(a)] for name, a in arrays.items()}
    with pytest.raises(CorruptSnapshotError, match="lies chunk"):
        for _ in read_chunks(store.storage, table, where="lies", into=inner):
            pass
    for name, a in arrays.items():  # nothing written outside the destination rows
        margin = guard // max(1, a[0].nbytes)
        assert not out[name][:margin].any() and not out[name][margin + len(a) :].any(), name


def test_every_flipped_byte_of_a_shifted_chunk_is_caught_even_without_verify(tmp_path: Path) -> None:
    arrays = shifted_pair(8, (ROW,), ended=[2], seed=5, sparse=True)
    store, table, path, _ = body_of(arrays, tmp_path)
    stored = path.read_bytes()
    passed = []
    for position in range(len(stored)):
        path.write_bytes(stored[:position] + bytes([stored[position] ^ 0xFF]) + stored[position + 1 :])
        out = {name: np.zeros_like(a) for name, a in arrays.items()}
        try:
            for _ in read_chunks(store.storage, table, where="flip", into=out):
                pass
        except CorruptSnapshotError:
            continue
        if any(not np.array_equal(out[n], a) for n, a in arrays.items()):
            passed.append(position)
    assert not passed, f"flips at {passed} returned rows that were not saved"


def test_a_reader_that_knows_only_format_2_is_told_to_upgrade(monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = shifted_pair(8, (ROW,), ended=[], seed=0, sparse=True)
    store = SnapshotStore("memory://shifts/format/run")
    store.save(1, {"b": ChunkedArrays(arrays, 8, kind="t", shifted={"next": "obs"})})
    monkeypatch.setattr(_chunks, "_TABLE_FORMATS", _chunks._TABLE_FORMATS[:2])
    with pytest.raises(CorruptSnapshotError, match="newer bucketsnap; upgrade"):
        ChunkTable.parse(store.load(1)["b"], "format")


def test_a_declared_shift_of_rows_too_small_or_empty_is_stored_as_it_is() -> None:
    """Found by review: a shifted pair of zero-byte rows (an SB3 dict space with a ``Box(shape=(0,))`` key)
    failed the save. Rows under 4 KiB, empty ones included, are stored plain and come back."""
    for width in [(0,), (16,)]:
        arrays = shifted_pair(12, width, ended=[3], seed=2)
        table, out = save_and_read(f"memory://shifts/{uuid.uuid4().hex}", arrays, 5, {"next": "obs"})
        assert not any(c["path"].endswith(".shift.zst") for c in table.chunks)
        for name, array in arrays.items():
            np.testing.assert_array_equal(out[name], array, err_msg=name)
