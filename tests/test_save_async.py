"""save_async: returns after a host copy, writes in the background, never loses an error."""

from __future__ import annotations

import threading
from concurrent.futures import wait

import numpy as np
import pytest
import torch

from bucketsnap import SnapshotExistsError, SnapshotStore, StorageError
from conftest import Backend


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
