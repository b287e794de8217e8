"""The buffer kind table (bucketsnap.buffers): stored names, a new kind as one entry, SB3's kinds loaded lazily."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import gymnasium
import numpy as np
import pytest
import torch
from stable_baselines3.common.buffers import DictReplayBuffer, ReplayBuffer

from bucketsnap import SnapshotStore
from bucketsnap import buffers as buffers_mod
from bucketsnap.buffers import (
    BufferKind,
    BufferState,
    SavedBuffer,
    TransitionStorage,
    buffer_state,
    register_buffer_kind,
    restore_buffer,
)


@pytest.fixture
def kind_table(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Whatever a test registers is gone after it."""
    buffers_mod._kinds()  # SB3's kinds register now (SB3 is imported), in the table kept after the test
    monkeypatch.setattr(buffers_mod, "_KINDS", list(buffers_mod._KINDS))
    yield


class Episodes:
    """A user's buffer none of the built-in kinds knows: whole episodes appended to growing arrays."""

    def __init__(self, capacity: int) -> None:
        self.obs = np.zeros((capacity, 3), np.float32)
        self.reward = np.zeros(capacity, np.float64)
        self.count = 0
        self.episodes = 0


class EpisodesKind(BufferKind):
    name = "tests.Episodes"

    def matches(self, buffer: Any) -> bool:
        return isinstance(buffer, Episodes)

    def state(self, buffer: Episodes) -> BufferState:
        return BufferState({"obs": buffer.obs, "reward": buffer.reward}, buffer.count, {"episodes": buffer.episodes})

    def restore(self, buffer: Episodes, saved: SavedBuffer) -> None:
        into = {"obs": buffer.obs, "reward": buffer.reward}
        saved.check_fields(into)
        saved.read_into(into)
        buffer.count, buffer.episodes = saved.table.rows, int(saved.attrs["episodes"])


def test_a_registered_kind_round_trips_through_a_store(kind_table: None) -> None:
    buffer = Episodes(50)
    buffer.obs[:20] = np.arange(60).reshape(20, 3)
    buffer.reward[:20] = np.linspace(0, 1, 20)
    buffer.count, buffer.episodes = 20, 4
    with pytest.raises(TypeError, match=r"cannot save a test_buffer_kinds\.Episodes"):
        buffer_state(buffer)

    register_buffer_kind(EpisodesKind())
    store = SnapshotStore("memory://kinds/run")
    store.save(1, {"episodes": buffer_state(buffer, chunk_rows=8)})
    assert store.open(1)["episodes"]["kind"] == "tests.Episodes"
    restored = restore_buffer(store, Episodes(50), key="episodes")
    assert (restored.count, restored.episodes) == (20, 4)
    np.testing.assert_array_equal(restored.obs, buffer.obs)
    np.testing.assert_array_equal(restored.reward, buffer.reward)
    with pytest.raises(ValueError, match=r"holds a tests\.Episodes buffer; it cannot be restored into a bucketsnap"):
        restore_buffer(store, TransitionStorage(50), key="episodes")
    with pytest.raises(ValueError, match="registered already"):
        register_buffer_kind(EpisodesKind())


class _Pytorchrl:
    def __init__(self) -> None:
        self.data: dict[str, torch.Tensor] = {"x": torch.zeros(2, 1)}

    def get_all_buffer_data(self, data_to_cpu: bool = False) -> dict[str, torch.Tensor]:
        return self.data

    def insert_data_slice(self, new_data: dict[str, Any]) -> None:
        pass

    def reset(self) -> None:
        pass


def test_the_stored_kind_names_are_those_of_existing_snapshots() -> None:
    obs, action = gymnasium.spaces.Box(-1, 1, (2,)), gymnasium.spaces.Discrete(2)
    storage = TransitionStorage(4)
    storage.insert_transition({"x": [1.0]})
    names = [
        buffer_state(ReplayBuffer(8, obs, action, device="cpu")).kind,
        buffer_state(DictReplayBuffer(8, gymnasium.spaces.Dict({"o": obs}), action, device="cpu")).kind,
        buffer_state(storage).kind,
        buffer_state(_Pytorchrl()).kind,
    ]
    assert names == [
        "sb3.ReplayBuffer",
        "sb3.DictReplayBuffer",
        "bucketsnap.TransitionStorage",
        "storage.get_all_buffer_data",
    ]


def test_sb3_is_never_imported_for_buffers_that_are_not_sb3s() -> None:
    code = textwrap.dedent(
        """
        import sys
        from bucketsnap import SnapshotStore
        from bucketsnap.buffers import TransitionStorage, buffer_state, restore_buffer

        storage = TransitionStorage(4)
        storage.insert_transition({"x": [1.0, 2.0]})
        store = SnapshotStore("memory://lazy/run")
        store.save(1, {"buf": buffer_state(storage)})
        restore_buffer(store, TransitionStorage(4), key="buf")
        try:
            buffer_state(object())
        except TypeError:
            pass
        print(sorted(m for m in sys.modules if m.startswith(("stable_baselines3", "bucketsnap.integrations"))))

        from stable_baselines3.common.buffers import ReplayBuffer  # now a buffer may be SB3's
        import gymnasium
        box = gymnasium.spaces.Box(-1, 1, (2,))
        kind = buffer_state(ReplayBuffer(8, box, box, device="cpu")).kind
        print(kind, "bucketsnap.integrations._sb3_buffers" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["[]", "sb3.ReplayBuffer True"]


def test_her_replay_buffers_are_refused_on_save_and_restore() -> None:
    from stable_baselines3 import HerReplayBuffer

    her = HerReplayBuffer.__new__(HerReplayBuffer)  # a DictReplayBuffer subclass: refused before any attribute is read
    with pytest.raises(TypeError, match="HerReplayBuffer is not supported"):
        buffer_state(her)
    store = SnapshotStore("memory://kinds/her")
    storage = TransitionStorage(4)
    storage.insert_transition({"x": [1.0]})
    store.save(1, {"replay_buffer": buffer_state(storage)})
    with pytest.raises(TypeError, match="HerReplayBuffer is not supported"):
        restore_buffer(store, her)
