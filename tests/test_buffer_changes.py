"""Incremental buffer saves: changes="ring" hashes only the rows the ring wrote, and nothing written is lost.

Every test restores what was saved into a fresh buffer and compares it with the buffer itself: a change that a
save failed to see shows there, whatever the counters say.
"""

from __future__ import annotations

import warnings
from typing import Any

import gymnasium
import numpy as np
import pytest
import torch
from stable_baselines3.common.buffers import ReplayBuffer

from bucketsnap import SnapshotStore, _buffer_changes, _chunks
from bucketsnap._buffer_changes import SPOT_CHECKS, Ring, changed_rows
from bucketsnap._chunks import CHUNK_DIR
from bucketsnap.buffers import TransitionStorage, buffer_state, restore_buffer

OBS = gymnasium.spaces.Box(0, 255, (16,), np.uint8)
ACT = gymnasium.spaces.Discrete(4)


def sb3_buffer(size: int = 400, **kwargs: Any) -> ReplayBuffer:
    return ReplayBuffer(size, OBS, ACT, device="cpu", **kwargs)


def add(buffer: ReplayBuffer, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(n):
        obs = rng.integers(0, 256, (1, 16), dtype=np.uint8)
        buffer.add(obs, obs + 1, rng.integers(0, 4, (1, 1)), rng.random(1), np.array([False]), [{}])


def restored_equals(store: SnapshotStore, buffer: ReplayBuffer, **kwargs: Any) -> bool:
    fresh = sb3_buffer(buffer.buffer_size, **kwargs)
    restore_buffer(store, fresh)
    same = (fresh.pos, fresh.full) == (buffer.pos, buffer.full)
    rows = buffer.buffer_size if buffer.full else buffer.pos  # what a buffer holds; the rest is stale
    for name in ("observations", "next_observations", "actions", "rewards", "dones", "timeouts"):
        ours = getattr(buffer, name)
        if ours is not None:
            same = same and np.array_equal(getattr(fresh, name)[:rows], ours[:rows])
    return same


def save(store: SnapshotStore, itr: int, buffer: Any, changes: str = "ring") -> _chunks.ChunkedArrays:
    value = buffer_state(buffer, chunk_rows=50, changes=changes)  # type: ignore[arg-type]
    store.save(itr, {"replay_buffer": value})
    return value


def test_changed_rows_follow_the_ring() -> None:
    assert changed_rows(Ring(10, 3, False), Ring(10, 5, False)) == [(3, 6)]  # and the row the next add writes
    assert changed_rows(Ring(10, 8, False), Ring(10, 2, True)) == [(8, 10), (0, 3)]
    assert changed_rows(Ring(10, 8, True), Ring(10, 1, True)) == [(8, 10), (0, 2)]
    assert changed_rows(Ring(10, 5, False), Ring(10, 2, False)) is None  # reset
    assert changed_rows(Ring(10, 5, True), Ring(10, 7, False)) is None  # reset
    assert changed_rows(Ring(10, 3, False), Ring(10, 3, True)) is None  # a whole turn
    assert changed_rows(Ring(10, 3, True, written=13), Ring(10, 3, True, written=23)) is None  # a whole turn
    assert changed_rows(Ring(10, 5, False, written=5), Ring(10, 2, False, written=7)) == [(0, 3)]  # reset, refill
    assert changed_rows(Ring(10, 3, False), Ring(12, 5, False)) is None


def test_a_ring_save_hashes_only_the_chunks_the_ring_wrote_and_restores_exact() -> None:
    store = SnapshotStore("memory://changes/ring")
    buffer = sb3_buffer(1000)
    add(buffer, 1000, seed=0)
    add(buffer, 130, seed=1)  # full, pos 130
    first = save(store, 1, buffer)
    assert first.hashed == 20  # nothing recorded yet: every chunk
    add(buffer, 60, seed=2)  # rows 130-189, and row 190 the next add writes
    second = save(store, 2, buffer)
    assert second.hashed == 2 + SPOT_CHECKS  # chunks [100, 150) and [150, 200), plus the spot checks
    new = set(store.open(2).info.refs) - set(store.open(1).info.refs)
    assert len(new) == 2 and all(r.startswith(f"{CHUNK_DIR}/") for r in new)
    assert restored_equals(store, buffer)


def test_hash_mode_saves_a_direct_write_anywhere() -> None:
    store = SnapshotStore("memory://changes/hash")
    buffer = sb3_buffer()
    add(buffer, 400, seed=0)
    save(store, 1, buffer, changes="hash")
    buffer.rewards[323] = 42.0  # inside a chunk, away from its edges: no ring, fingerprint or rotation sees it
    value = save(store, 2, buffer, changes="hash")
    assert value.hashed == 8
    assert restored_equals(store, buffer)


def test_a_ring_save_after_a_direct_write_saves_it_once_the_rotation_reaches_its_chunk() -> None:
    store = SnapshotStore("memory://changes/poke")
    buffer = sb3_buffer()
    add(buffer, 410, seed=0)  # full, pos 10
    save(store, 1, buffer)
    buffer.rewards[323] = 42.0  # chunk [300, 350), inside it
    caught = None
    for itr in range(2, 2 + 8):  # 8 chunks, SPOT_CHECKS of them hashed whole per save
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            save(store, itr, buffer)
        if seen:
            assert "ring position" in str(seen[0].message)
            caught = itr
            break
        assert not restored_equals(store, buffer)  # what docs/buffers.md says: saved late, not at once
    assert caught is not None, "no save's rotation reached the poked chunk"
    assert restored_equals(store, buffer)


def test_a_direct_write_at_a_chunks_edge_is_saved_by_the_next_ring_save() -> None:
    store = SnapshotStore("memory://changes/edge")
    buffer = sb3_buffer()
    add(buffer, 410, seed=0)
    save(store, 1, buffer)
    buffer.observations[249] = 7  # the last row of chunk [200, 250): its fingerprint
    with pytest.warns(RuntimeWarning, match="ring position"):
        value = save(store, 2, buffer)
    assert value.hashed == 8
    assert restored_equals(store, buffer)


def test_an_sb3_reset_then_refill_past_the_old_position_is_saved(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_buffer_changes, "SPOT_CHECKS", 0)  # the chunks' edge fingerprints alone must see it
    store = SnapshotStore("memory://changes/refill")
    buffer = sb3_buffer(1000)
    add(buffer, 530, seed=0)
    save(store, 1, buffer)
    buffer.reset()
    add(buffer, 560, seed=5)  # pos 560 > 530: the position alone looks like 30 more transitions
    with pytest.warns(RuntimeWarning, match="a reset and refill"):
        assert save(store, 2, buffer).hashed == 12
    assert restored_equals(store, buffer)
    buffer.reset()  # and a plain reset: the position moved back, so every chunk is hashed
    add(buffer, 20, seed=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value = save(store, 3, buffer)
    assert value.hashed == 1
    assert restored_equals(store, buffer)


def test_a_transition_storage_counts_its_writes_across_resets() -> None:
    store = SnapshotStore("memory://changes/storage")
    rng = np.random.default_rng(0)
    storage = TransitionStorage(400)
    storage.insert_data_slice({"obs": rng.random((300, 8), dtype=np.float32)})
    save(store, 1, storage)
    storage.reset()
    storage.insert_data_slice({"obs": rng.random((320, 8), dtype=np.float32)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rows_written says exactly which rows changed: nothing to warn about
        value = save(store, 2, storage)
    assert value.hashed == 7  # rows 0-320 and the next: chunks 0..6
    restored = TransitionStorage(400)
    restore_buffer(store, restored)
    assert torch.equal(restored.data["obs"], storage.data["obs"])
    storage.insert_data_slice({"obs": rng.random((400, 8), dtype=np.float32)})  # a whole turn: all of it
    assert save(store, 3, storage).hashed == 8
    restore_buffer(store, restored)
    assert torch.equal(restored.data["obs"], storage.data["obs"])


def test_a_restore_into_the_buffer_is_saved_by_the_next_ring_save() -> None:
    store = SnapshotStore("memory://changes/restore")
    a = sb3_buffer()
    add(a, 410, seed=0)  # full, pos 10
    save(store, 1, a)
    b = sb3_buffer()
    for name in ("observations", "next_observations", "actions", "rewards", "dones", "timeouts"):
        getattr(b, name)[:] = getattr(a, name)
    b.pos, b.full = a.pos, a.full
    b.rewards[210:220] = -1.0  # inside chunk [200, 250), away from its edges and the spot checks
    add(b, 2, seed=9)  # pos 12
    save(store, 2, b, changes="hash")
    restore_buffer(store, a, which=2)  # a's rows 210-219 and 10-12 are rewritten, its position moves on by 2
    add(a, 1, seed=10)
    save(store, 3, a)
    assert restored_equals(store, a)


def test_new_arrays_or_another_chunking_hash_everything() -> None:
    store = SnapshotStore("memory://changes/layout")
    buffer = sb3_buffer()
    add(buffer, 100, seed=0)
    save(store, 1, buffer)
    buffer.rewards = buffer.rewards.copy()
    buffer.rewards[0] = 9.0
    add(buffer, 1, seed=1)
    assert save(store, 2, buffer).hashed == 3
    assert restored_equals(store, buffer)
    value = buffer_state(buffer, chunk_rows=40, changes="ring")
    store.save(3, {"replay_buffer": value})
    assert value.hashed == 3


def test_a_background_ring_save_hashes_its_copy() -> None:
    store = SnapshotStore("memory://changes/async")
    buffer = sb3_buffer()
    add(buffer, 410, seed=0)
    store.save_async(1, {"replay_buffer": buffer_state(buffer, chunk_rows=50, changes="ring")}).result()
    add(buffer, 30, seed=1)
    expected = sb3_buffer()
    for name in ("observations", "next_observations", "actions", "rewards", "dones", "timeouts"):
        getattr(expected, name)[:] = getattr(buffer, name)
    expected.pos, expected.full = buffer.pos, buffer.full
    future = store.save_async(2, {"replay_buffer": buffer_state(buffer, chunk_rows=50, changes="ring")})
    add(buffer, 30, seed=2)  # the loop goes on while the copy is saved
    future.result()
    assert restored_equals(store, expected)
    assert save(store, 3, buffer).hashed == 2 + SPOT_CHECKS  # from the record of save 2: rows 40-70 again
    assert restored_equals(store, buffer)
    store.close()


def test_changes_is_checked() -> None:
    with pytest.raises(ValueError, match="changes must be 'hash' or 'ring'"):
        buffer_state(sb3_buffer(), changes="rows")  # type: ignore[arg-type]


def test_format_1_tables_of_sha256_ids_stay_readable(monkeypatch: pytest.MonkeyPatch) -> None:
    store = SnapshotStore("memory://changes/format-1")
    buffer = sb3_buffer()
    add(buffer, 120, seed=0)
    with monkeypatch.context() as m:
        m.setattr(_chunks, "HASH", "sha256")
        m.setattr(_chunks, "TABLE_FORMAT", "bucketsnap.chunked/1")
        m.setattr(_chunks.ChunkedArrays, "_shifts", lambda self, rows: {})  # format 1 stored every row
        save(store, 1, buffer, changes="hash")
    assert store.load(1)["replay_buffer"]["format"] == "bucketsnap.chunked/1"
    fresh = sb3_buffer()
    restore_buffer(store, fresh, verify=True)  # sha256 ids checked as sha256
    assert restored_equals(store, buffer)
    value = save(store, 2, buffer, changes="hash")
    table = store.load(2)["replay_buffer"]
    assert (table["format"], table["hash"]) == ("bucketsnap.chunked/2", "blake3")
    assert not set(store.open(2).info.refs) & set(store.open(1).info.refs)  # no dedup against sha256 ids
    assert value.hashed == 3
    restore_buffer(store, fresh, verify=True)


# -- changes="hash": every chunk's rows read, only the changed ones hashed with BLAKE3 ------------------------


def test_a_hash_save_reads_every_chunk_and_hashes_with_blake3_only_those_whose_rows_changed() -> None:
    """docs/buffers.md: a save with changes="hash" reads every chunk, and hashes with BLAKE3 only the chunks
    whose rows' XXH3-128 differs from the one the buffer's last save in this process recorded."""
    store = SnapshotStore("memory://changes/hash-digests")
    buffer = sb3_buffer(1000)
    add(buffer, 1000, seed=0)
    first = save(store, 1, buffer, changes="hash")
    assert (first.hashed, first.rehashed) == (20, 20)  # nothing recorded yet
    buffer.rewards[420] += 1.0  # a direct write, which the ring position does not see: chunk [400, 450)
    buffer.observations[999] ^= 1  # and chunk [950, 1000)
    second = save(store, 2, buffer, changes="hash")
    assert (second.hashed, second.rehashed) == (20, 2)
    assert restored_equals(store, buffer)
    assert len(set(store.info(2).refs) - set(store.info(1).refs)) == 2


def test_a_hash_save_after_any_writes_restores_exactly_what_the_buffer_held() -> None:
    """Direct writes anywhere, rows put back as they were at an earlier save, saves in the background and
    restores into the buffer, in random order: after every save, the snapshot holds what the buffer held then."""
    rng = np.random.default_rng(7)
    store = SnapshotStore("memory://changes/hash-random")
    buffer = sb3_buffer(400)
    add(buffer, 400, seed=3)
    kept: dict[int, Any] = {}  # itr -> the buffer's arrays when it was saved
    for itr in range(1, 41):
        action = rng.integers(0, 5)
        if action == 0:
            add(buffer, int(rng.integers(1, 120)), seed=itr)
        elif action == 1:  # a direct write into any field, any row
            name = ("observations", "next_observations", "rewards", "actions", "dones")[rng.integers(0, 5)]
            array = getattr(buffer, name)
            array[rng.integers(0, 400)] = array.dtype.type(rng.integers(0, 3))
        elif action == 2 and kept:  # every row back as an earlier save had it
            earlier = kept[int(rng.choice(sorted(kept)))]
            for name, a in earlier.items():
                getattr(buffer, name)[:] = a
        elif action == 3 and kept:  # the buffer restored from a snapshot, as on resume
            restore_buffer(store, buffer, which=int(rng.choice(sorted(kept))))
        value = buffer_state(buffer, chunk_rows=50, changes="hash")
        snapshot = {
            name: getattr(buffer, name).copy()
            for name in ("observations", "next_observations", "actions", "rewards", "dones", "timeouts")
        }
        if rng.integers(0, 2):
            store.save_async(itr, {"replay_buffer": value}).result()
        else:
            store.save(itr, {"replay_buffer": value})
        kept[itr] = snapshot
        fresh = sb3_buffer(400)
        restore_buffer(store, fresh, which=itr, verify=True)
        for name, a in snapshot.items():
            assert np.array_equal(getattr(fresh, name), a), (itr, name)


def test_a_chunk_compressed_from_other_rows_than_it_was_hashed_from_keeps_no_digest_of_the_first() -> None:
    """The digest kept for a chunk is of the bytes its id names: rows written between the hash and the
    compression make the chunk stored under the id of what was compressed, and the next save of the first rows
    must not take that id from a digest of them."""
    store = SnapshotStore("memory://changes/hash-race")
    buffer = sb3_buffer(400)
    add(buffer, 400, seed=5)
    save(store, 1, buffer, changes="hash")
    first = buffer.rewards.copy()
    buffer.rewards[10] += 1.0
    value = buffer_state(buffer, chunk_rows=50, changes="hash")
    compress = value._compress

    def written_meanwhile(bounds: tuple[int, int]) -> Any:
        if bounds == (0, 50):
            buffer.rewards[:] = first  # back to what save 1 held, after the rows were hashed as changed
        return compress(bounds)

    value._compress = written_meanwhile  # type: ignore[method-assign]
    store.save(2, {"replay_buffer": value})
    assert restored_equals(store, buffer)  # save 2 holds the rows as compressed: save 1's
    buffer.rewards[10] += 1.0  # the rows hashed for save 2, again
    save(store, 3, buffer, changes="hash")
    assert restored_equals(store, buffer)


def test_a_hash_save_sees_a_direct_write_into_a_field_stored_as_shifted_rows() -> None:
    """Rows of 4 KiB or more: next_observations are stored as records of the observations they repeat, and a
    chunk's id is the hash of that encoding; its XXH3-128 must still cover the field's own rows (found by
    review: leaving them out saved such a write as the old rows, and no test saw it)."""
    space = gymnasium.spaces.Box(0, 255, (4096,), np.uint8)
    rng = np.random.default_rng(0)
    buffer = ReplayBuffer(64, space, gymnasium.spaces.Box(-1, 1, (2,), np.float32), device="cpu")
    for i in range(64):
        obs, next_obs = (rng.integers(0, 256, (1, 4096), dtype=np.uint8) for _ in range(2))
        buffer.add(obs, next_obs, rng.uniform(-1, 1, (1, 2)), rng.random(1), np.array([i % 7 == 0]), [{}])
    store = SnapshotStore("memory://changes/hash-shifted")
    store.save(1, {"rb": buffer_state(buffer, chunk_rows=8)})
    assert any(path.endswith(".shift.zst") for path in store.info(1).refs)
    buffer.next_observations[20, 0, 5] ^= 1  # a direct write into a shifted field's row
    value = buffer_state(buffer, chunk_rows=8)
    store.save(2, {"rb": value})
    assert (value.hashed, value.rehashed) == (8, 1)  # the shifted chunks unchanged are taken from save 1 too
    fresh = ReplayBuffer(64, space, gymnasium.spaces.Box(-1, 1, (2,), np.float32), device="cpu")
    restore_buffer(store, fresh, key="rb", which=2, verify=True)
    assert np.array_equal(fresh.next_observations, buffer.next_observations)


def test_a_buffer_without_a_ring_position_is_not_kept_alive_by_its_record() -> None:
    """A kind that hands over fresh copies of its arrays (pytorchrl's, from a device) is found unchanged by its
    digests alone: its record keeps no array (found by review: it kept a whole host copy alive)."""
    import gc
    import weakref

    class Copies:
        """pytorchrl's protocol, handing over a copy of its data on every call."""

        def __init__(self) -> None:
            self.data = {"obs": torch.arange(64 * 1024, dtype=torch.float32).reshape(64, 1024)}

        def get_all_buffer_data(self, data_to_cpu: bool = False) -> dict[str, torch.Tensor]:
            return {name: t.clone() for name, t in self.data.items()}

        def insert_data_slice(self, data: dict[str, torch.Tensor]) -> None:
            self.data = {name: t.clone() for name, t in data.items()}

        def reset(self) -> None:
            pass

    buffer = Copies()
    store = SnapshotStore("memory://changes/no-ring")
    first = buffer_state(buffer, chunk_rows=8)
    copy = weakref.ref(next(iter(first.arrays.values())))
    store.save(1, {"rb": first})
    del first
    gc.collect()
    assert copy() is None  # the copy the save read is gone once the save is
    buffer.data["obs"][40, 3] = -1.0
    second = buffer_state(buffer, chunk_rows=8)
    store.save(2, {"rb": second})
    assert (second.hashed, second.rehashed) == (8, 1)
