"""save_async: returns after a host copy, writes in the background, never loses an error."""

from __future__ import annotations

import copy
import threading
from collections.abc import Mapping
from concurrent.futures import wait
from typing import Any

import numpy as np
import pytest
import torch

from bucketsnap import SnapshotExistsError, SnapshotStore, StorageError
from bucketsnap._background import BackgroundSaves, SaveFuture
from bucketsnap._host_copies import HostCopies
from conftest import Backend
from helpers import assert_same, every_value_type


def test_state_may_change_right_after_save_async(backend: Backend) -> None:
    store = backend.store()
    weights = torch.zeros(1000)
    frames = np.zeros(500, dtype=np.uint8)
    future = store.save_async(1, {"policy": {"w": weights}, "frames": frames, "step": 1})
    weights += 1  # the training loop goes on immediately
    frames[:] = 7
    info = future.result()
    assert info.itr == 1
    restored = store.load(1)
    assert torch.equal(restored["policy"]["w"], torch.zeros(1000))
    assert not restored["frames"].any()
    store.close()


def test_at_most_max_in_flight_and_flush_waits() -> None:
    store = SnapshotStore("memory://async/bounded", max_in_flight=1)
    running, peak = 0, 0
    lock = threading.Lock()
    original = store._write

    def counting_write(prepared, progress=None):  # type: ignore[no-untyped-def]
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        try:
            return original(prepared, progress)
        finally:
            with lock:
                running -= 1

    store._write = counting_write  # type: ignore[method-assign]
    futures = [store.save_async(i, {"w": torch.randn(50_000)}) for i in range(6)]
    store.flush()
    assert all(f.done() for f in futures)
    assert peak == 1
    assert store.itrs() == list(range(6))
    store.close()


def test_background_error_surfaces_on_future_next_save_and_close() -> None:
    store = SnapshotStore("memory://async/errors")
    store.save(1, {"v": 1})
    future = store.save_async(1, {"v": 2})  # already committed: fails in the background
    with pytest.raises(SnapshotExistsError):
        future.result()
    store.save(2, {"v": 2})  # the caller saw it through the future: not raised a second time
    unobserved = store.save_async(1, {"v": 3})
    wait([unobserved])  # finished, but nobody asked it for its result
    with pytest.raises(SnapshotExistsError):
        store.save(3, {"v": 3})  # nobody asked the future: the next save reports it
    store.save(3, {"v": 3})  # and only once
    store.save_async(1, {"v": 4})
    with pytest.raises(SnapshotExistsError):
        store.close()


def test_context_manager_waits_and_raises(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with SnapshotStore(str(tmp_path / "run")) as store:
        store.save_async(1, {"w": torch.ones(10)})
    assert SnapshotStore(str(tmp_path / "run")).itrs() == [1]
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the run directory should be")
    with pytest.raises(StorageError, match="blocked"), SnapshotStore(str(blocked)) as store:
        store.save_async(1, {"w": torch.ones(10)})


def test_an_error_seen_through_exception_is_not_raised_again() -> None:
    store = SnapshotStore("memory://async/seen")
    store.save(1, {"v": 1})
    assert isinstance(store.save_async(1, {"v": 2}).exception(), SnapshotExistsError)
    store.flush()
    store.close()


# -- host copies kept between saves (bucketsnap._host_copies) -----------------------------------------------------


def _scramble(value: Any) -> None:
    """Overwrite, in place, every tensor and array in ``value``, as a training step would."""
    if isinstance(value, torch.Tensor):
        with torch.no_grad():
            value.fill_(7)
    elif isinstance(value, np.ndarray):
        value[...] = np.full_like(value, 7) if value.dtype.names is None else (7, 7.0)
    elif isinstance(value, Mapping):
        for v in value.values():
            _scramble(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _scramble(v)


def _odd_values() -> dict[str, Any]:
    """Every value type, plus the tensor views a host copy must resolve: conj, neg, transposed, bf16 slices."""
    state = every_value_type()
    base = torch.randn(3, 4, dtype=torch.complex64)
    state["views"] = {
        "conj": base.conj(),
        "neg": torch._neg_view(torch.randn(4, 3)),
        "conj_t": base.conj().t(),
        "bf16_t": torch.randn(5, 6).to(torch.bfloat16).t()[::2],
        "np_0d": np.array(2.5, dtype=np.float32),
        "np_0d_bytes": np.array(b"ab"),
        "np_strided": np.arange(40, dtype=np.int16).reshape(5, 8)[:, ::3],
        "np_empty": np.empty((0, 3), dtype=np.float64),
    }
    return state


def _pool(store: SnapshotStore) -> HostCopies:
    return store._host_copies


def test_every_value_type_round_trips_through_reused_host_copies(backend: Backend) -> None:
    store = backend.store()
    state = _odd_values()
    for itr in range(3):  # the first save allocates, the later ones reuse
        expected = copy.deepcopy(state)
        future = store.save_async(itr, state)
        _scramble(state)  # at once: the host copies must already be taken
        future.result()
        assert_same(store.load(itr), expected)
    assert _pool(store).reused > 0
    store.close()


def test_second_save_copies_into_the_first_saves_buffers() -> None:
    store = SnapshotStore("memory://async/reuse")
    state = {"policy": {"w": torch.randn(1000, 100), "b": torch.randn(100)}, "frames": np.ones((8, 84, 84), np.uint8)}
    nbytes = 1000 * 100 * 4 + 100 * 4 + 8 * 84 * 84
    store.save_async(1, state).result()
    pool = _pool(store)
    assert (pool.allocated, pool.reused, pool.free_bytes, pool.busy_bytes) == (3, 0, nbytes, 0)
    kept = {buffer.data_ptr() for buffers in pool._free.values() for buffer in buffers}
    saved = state["policy"]["w"].clone()
    state["policy"]["w"] += 1
    future = store.save_async(2, state)
    assert pool.busy_bytes == nbytes and pool.free_bytes == 0  # taken by save 2 until it is written
    future.result()
    assert (pool.allocated, pool.reused) == (3, 3)
    assert {buffer.data_ptr() for buffers in pool._free.values() for buffer in buffers} == kept
    assert torch.equal(store.load(2)["policy"]["w"], state["policy"]["w"])
    assert torch.equal(store.load(1)["policy"]["w"], saved)
    store.close()


def _gated(store: SnapshotStore) -> tuple[threading.Event, threading.Event]:
    """Make the store's background writes wait for ``go`` before they read the host copies; ``started`` is
    set when a write is waiting."""
    go, started = threading.Event(), threading.Event()
    original = store._write

    def gated_write(prepared, progress=None):  # type: ignore[no-untyped-def]
        started.set()
        assert go.wait(10)
        return original(prepared, progress)

    store._write = gated_write  # type: ignore[method-assign]
    return go, started


def test_a_save_still_writing_keeps_its_buffers_while_later_saves_copy() -> None:
    store = SnapshotStore("memory://async/overlap", max_in_flight=2)
    go, started = _gated(store)
    weights = torch.zeros(10_000)
    frames = np.zeros(5000, dtype=np.uint8)
    first = store.save_async(1, {"w": weights, "frames": frames})
    assert started.wait(10)  # save 1 holds its copies and has not written them yet
    weights += 1
    frames[:] = 1
    second = store.save_async(2, {"w": weights, "frames": frames})  # must not be handed save 1's buffers
    weights += 1
    frames[:] = 2
    assert _pool(store).reused == 0
    go.set()
    first.result()
    second.result()
    third = store.save_async(3, {"w": weights, "frames": frames})  # now reuses one of the earlier sets
    weights += 1
    frames[:] = 3
    third.result()
    assert _pool(store).reused == 2
    for itr in (1, 2, 3):
        restored = store.load(itr)
        assert torch.equal(restored["w"], torch.full((10_000,), float(itr - 1)))
        assert (restored["frames"] == itr - 1).all()
    store.close()


def test_the_pool_holds_at_most_max_in_flight_plus_one_states_while_saves_overlap() -> None:
    store = SnapshotStore("memory://async/bound", max_in_flight=1)
    go, _ = _gated(store)
    go.set()
    state = {"w": torch.zeros(50_000)}
    futures = []
    for itr in range(8):
        futures.append(store.save_async(itr, state))
        state["w"] += 1
        pool = _pool(store)
        assert pool.free_bytes + pool.busy_bytes <= 2 * 200_000
    for future in futures:
        future.result()
    assert [store.load(i)["w"][0].item() for i in range(8)] == [float(i) for i in range(8)]
    store.close()


def test_a_failed_save_gives_its_buffers_back() -> None:
    store = SnapshotStore("memory://async/failed")
    store.save(1, {"w": torch.zeros(1000)})
    future = store.save_async(1, {"w": torch.ones(1000)})  # already committed: fails in the background
    with pytest.raises(SnapshotExistsError):
        future.result()
    pool = _pool(store)
    assert (pool.busy_bytes, pool.free_bytes) == (0, 4000)
    store.save_async(2, {"w": torch.ones(1000)}).result()
    assert (pool.allocated, pool.reused) == (1, 1)
    assert torch.equal(store.load(2)["w"], torch.ones(1000))
    store.close()


def test_a_save_whose_copy_fails_gives_back_what_it_took() -> None:
    class Unpicklable:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            raise TypeError("cannot pickle this")

    store = SnapshotStore("memory://async/copy-fails")
    with pytest.raises(TypeError, match="cannot pickle"):
        store.save_async(1, {"w": torch.ones(1000), "z": Unpicklable()})
    pool = _pool(store)
    assert (pool.busy_bytes, pool.free_bytes) == (0, 4000)
    store.close()


def test_a_cancelled_save_gives_its_buffers_back() -> None:
    saves: BackgroundSaves[int] = BackgroundSaves(1)
    ended: list[str] = []
    future: SaveFuture[int] = SaveFuture(saves)
    saves._slots.acquire()  # as submit does before it schedules the job
    saves._in_flight.add(future)
    assert future.cancel()  # cancelled before a thread picked it up
    saves._run(lambda: ended.append("ran") or 1, future, lambda: ended.append("on_end"))
    assert ended == ["on_end"]
    assert saves.pending() == []


def test_a_job_ends_before_its_future_wakes_the_caller() -> None:
    saves: BackgroundSaves[int] = BackgroundSaves(1)
    ended = threading.Event()
    for fails in (False, True):
        ended.clear()

        def job(fails: bool = fails) -> int:
            if fails:
                raise OSError("upload failed")
            return 1

        future = saves.submit(job, on_end=ended.set)
        future.exception()
        assert ended.is_set()  # a save_async awaited before the next finds the buffers back in the pool
    saves.close()


def test_the_pool_follows_the_states_shapes() -> None:
    store = SnapshotStore("memory://async/shapes")
    pool = _pool(store)
    store.save_async(1, {"w": torch.zeros(1000), "b": torch.zeros(10)}).result()
    assert pool.free_bytes == 4040
    store.save_async(2, {"w": torch.zeros(2000), "b": torch.zeros(10)}).result()
    assert pool.free_bytes == 8040  # the 4000-byte buffer nobody took was dropped after the copy
    store.save_async(3, {"w": torch.zeros(500)}).result()
    assert pool.free_bytes == 2000
    assert pool.reused == 1
    store.close()


def test_close_releases_the_kept_host_copies() -> None:
    store = SnapshotStore("memory://async/close")
    store.save_async(1, {"w": torch.zeros(1000)}).result()
    assert _pool(store).free_bytes == 4000
    store.close()
    assert (_pool(store).free_bytes, _pool(store).busy_bytes) == (0, 0)


def test_keep_host_copies_false_frees_each_copy_when_its_save_ends() -> None:
    store = SnapshotStore("memory://async/nokeep", keep_host_copies=False)
    for itr in range(3):
        weights = torch.full((1000,), float(itr))
        store.save_async(itr, {"w": weights}).result()
        assert (_pool(store).free_bytes, _pool(store).busy_bytes) == (0, 0)
        assert torch.equal(store.load(itr)["w"], weights)
    assert (_pool(store).allocated, _pool(store).reused) == (3, 0)
    store.close()


def test_host_copies_stay_on_the_cpu_whatever_the_default_device() -> None:
    store = SnapshotStore("memory://async/default-device")
    state = {"w": torch.randn(100), "rng": np.random.default_rng(0).integers(0, 9, 10)}
    for itr in range(2):
        with torch.device("meta"):  # as torch.set_default_device("cuda") would, on a GPU host
            store.save_async(itr, state).result()
        assert all(b.device.type == "cpu" for buffers in _pool(store)._free.values() for b in buffers)
        restored = store.load(itr)
        assert torch.equal(restored["w"], state["w"]) and (restored["rng"] == state["rng"]).all()
    store.close()


def test_structured_arrays_never_carry_stale_bytes_in_their_padding() -> None:
    store = SnapshotStore("memory://async/structured")
    aligned = np.dtype([("a", np.uint8), ("b", np.float64)], align=True)  # 7 padding bytes per row
    rows = np.zeros(64, dtype=aligned)
    rows["a"], rows["b"] = 1, 2.5
    store.save_async(1, {"frames": np.full(64 * 16, 0xAB, np.uint8)}).result()  # leaves 0xAB in a kept buffer
    store.save_async(2, {"rows": rows}).result()
    assert store.load(2)["rows"].tobytes() == rows.tobytes()  # padding zeros, as np.zeros made them
    store.close()


def test_a_save_inside_inference_mode_leaves_buffers_a_later_save_can_write() -> None:
    store = SnapshotStore("memory://async/inference")
    with torch.inference_mode():
        store.save_async(1, {"w": torch.zeros(1000)}).result()
    store.save_async(2, {"w": torch.ones(1000)}).result()
    assert _pool(store).reused == 1
    assert torch.equal(store.load(2)["w"], torch.ones(1000))
    store.close()
