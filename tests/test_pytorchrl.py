"""pytorchrl's own storages saved with buffer_state and restored with restore_buffer, against the real package.

The two failures this holds: saving a ReplayBuffer whose collectors inserted recurrent hidden states raised
"fields with different numbers of rows: {1, 60}" (they are 1-row placeholders), and restoring into a freshly
built storage raised KeyError: 'Observation' (pytorchrl allocates its tensors from the first sample).
"""

from __future__ import annotations

import json
import sys
import warnings
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

warnings.filterwarnings("ignore", message=".*Gym.*")
pytest.importorskip("pytorchrl")

sys.path.insert(0, str(Path(__file__).parent / "workers"))
import pytorchrl_storage as storages  # noqa: E402

from bucketsnap import SnapshotStore  # noqa: E402
from bucketsnap.buffers import buffer_state, restore_buffer  # noqa: E402
from helpers import Worker  # noqa: E402

WORKER = Path(__file__).parent / "workers" / "pytorchrl_storage.py"
KINDS = ["replay", "nstep", "onpolicy", "gae"]


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("transitions", [30, 60], ids=["filling", "wrapped"])
def test_a_storage_restores_exactly_into_a_fresh_one(memory_backend: Any, kind: str, transitions: int) -> None:
    check_round_trip(memory_backend, kind, transitions)


def test_a_wrapped_replay_buffer_round_trips_on_every_backend(backend: Any) -> None:
    check_round_trip(backend, "replay", 60)


def check_round_trip(backend: Any, kind: str, transitions: int) -> None:
    size = 50 if kind in ("replay", "nstep") else 20
    transitions = transitions if kind in ("replay", "nstep") else min(transitions, 20)
    saved = storages.filled(kind, transitions, size=size)
    store = backend.store()
    store.save(1, {"replay_buffer": buffer_state(saved)})
    fresh = storages.build(kind, size)
    assert not fresh.data or all(v is None for v in fresh.data.values()), "pytorchrl allocates lazily"
    restore_buffer(store, fresh)
    assert_same(storages.state_of(saved), storages.state_of(fresh))
    assert type(fresh.data[storages.prl.OBS]) is type(saved.data[storages.prl.OBS])
    # pytorchrl's own view of it matches too.
    ours, theirs = fresh.get_all_buffer_data(), saved.get_all_buffer_data()
    assert_same({k: np.asarray(v) for k, v in ours.items()}, {k: np.asarray(v) for k, v in theirs.items()})


# On local disk on demand (`-m slow`): the S3 variant runs the same worker; local disk's store is held by the rest.
@pytest.mark.parametrize(
    "where", [pytest.param("local", marks=pytest.mark.slow), pytest.param("s3", marks=pytest.mark.s3)]
)
def test_a_fresh_process_restores_the_storages_and_trains_on(
    request: pytest.FixtureRequest, where: str, tmp_path: Path
) -> None:
    backend = request.getfixturevalue(f"{where}_backend")
    jobs = []
    for kind in ("replay", "nstep", "onpolicy"):
        saved = storages.filled(kind, 60 if kind != "onpolicy" else 20, size=50)
        store = backend.store(kind)
        store.save(3, {"replay_buffer": buffer_state(saved)})
        jobs.append((kind, saved, store.url, tmp_path / f"{kind}.npz"))
    argv = [json.dumps(backend.options)]
    for kind, _, url, out in jobs:
        argv += [kind, url, str(out)]
    worker = Worker(str(WORKER), argv, tmp_path / "worker.out", tmp_path / "worker.err")
    assert worker.wait(300) == 0, (tmp_path / "worker.err").read_text()[-3000:]
    for _kind, saved, _, out in jobs:
        with np.load(out) as restored:
            assert_same(storages.state_of(saved), dict(restored))


def test_a_used_storage_is_overwritten_by_the_restore(memory_backend: Any) -> None:
    store = memory_backend.store()
    saved = storages.filled("replay", 60)
    store.save(1, {"replay_buffer": buffer_state(saved)})
    used = storages.filled("replay", 7, seed=5)
    restore_buffer(store, used)
    assert_same(storages.state_of(saved), storages.state_of(used))


def test_the_pending_n_step_transitions_come_back(memory_backend: Any) -> None:
    saved = storages.filled("nstep", 9)
    assert any(len(d) for d in saved.n_step_buffer.values()), "the test needs pending n-step transitions"
    store = memory_backend.store()
    store.save(1, {"replay_buffer": buffer_state(saved)})
    fresh = storages.build("nstep")
    restore_buffer(store, fresh)
    for key, pending in saved.n_step_buffer.items():
        assert isinstance(fresh.n_step_buffer[key], deque) and fresh.n_step_buffer[key].maxlen == pending.maxlen
    # Both go on the same way: the same next transitions give the same storage.
    generator_a, generator_b = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    for _ in range(5):
        saved.insert_transition(storages.sample("nstep", generator_a))
        fresh.insert_transition(storages.sample("nstep", generator_b))
    assert_same(storages.state_of(saved), storages.state_of(fresh))


def test_no_pickle_is_involved(memory_backend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    store = memory_backend.store()
    store.save(1, {"replay_buffer": buffer_state(storages.filled("nstep", 9))})
    assert not store.open("last").info.members["replay_buffer"].pickled

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("pickle was used")

    import pickle

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    restore_buffer(store, storages.build("nstep"))


def test_a_storage_of_another_size_or_class_is_refused(memory_backend: Any) -> None:
    store = memory_backend.store()
    store.save(1, {"replay_buffer": buffer_state(storages.filled("replay", 10))})
    with pytest.raises(ValueError, match="max_size 50; this one has 40"):
        restore_buffer(store, storages.build("replay", 40))
    with pytest.raises(ValueError, match=r"ReplayBuffer; this storage is a .*NStepReplayBuffer"):
        restore_buffer(store, storages.build("nstep"))


def test_an_empty_storage_and_unknown_state_are_refused_not_saved_incompletely() -> None:
    with pytest.raises(ValueError, match="holds no data yet"):
        buffer_state(storages.build("replay"))
    storage = storages.filled("replay", 3)
    storage.schedule = lambda step: 0.1  # state bucketsnap cannot save without pickle
    with pytest.raises(TypeError, match=r"attribute 'schedule' holds a .*function"):
        buffer_state(storage)


def test_rows_not_written_yet_keep_their_values(memory_backend: Any) -> None:
    """A PERBuffer gives rows it has not written yet its default priority: restored as zeros, the transitions
    inserted after a restore would never be sampled."""
    storage = storages.filled("per", 10)
    assert (storage.data["priority"][10:] != 0).all(), "the test needs PER's default priority in unwritten rows"
    store = memory_backend.store()
    store.save(1, {"replay_buffer": buffer_state(storage)})
    fresh = storages.build("per")
    restore_buffer(store, fresh)
    assert_same(storages.state_of(storage), storages.state_of(fresh))
    for buffer in (storage, fresh):
        buffer.insert_transition(storages.sample("per", torch.Generator().manual_seed(3)))
        buffer.before_gradients()
    assert_same(storages.state_of(storage), storages.state_of(fresh))
    assert "RecurrentHiddenStates" in store.open("last")["replay_buffer"]["attrs"]["small_fields"]


def test_a_recurrent_actors_storage_round_trips(memory_backend: Any) -> None:
    storage = storages.filled("recurrent", 30)
    store = memory_backend.store()
    store.save(1, {"replay_buffer": buffer_state(storage)})
    fresh = storages.build("recurrent")
    restore_buffer(store, fresh)
    assert_same(storages.state_of(storage), storages.state_of(fresh))


def test_a_saved_storage_lists_in_the_snapshot_as_an_ordinary_member(memory_backend: Any) -> None:
    store = memory_backend.store()
    store.save(1, {"replay_buffer": buffer_state(storages.filled("gae", 12, size=20))})
    assert SnapshotStore(store.url).open("last").info.members["replay_buffer"].raw_size > 0
