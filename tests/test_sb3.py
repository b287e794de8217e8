"""Stable-Baselines3 interop, checked against SB3 itself: round trips, SB3's own zips both ways, the callback."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import fsspec
import gymnasium
import numpy as np
import pytest
import torch
from stable_baselines3 import DQN, PPO, SAC
from stable_baselines3.common.base_class import BaseAlgorithm

import counting_fs
from bucketsnap import SnapshotStore, UnsafeLoadError
from bucketsnap.integrations.sb3 import (
    SnapshotCallback,
    export_sb3_zip,
    load_model,
    load_sb3_zip,
    save_model,
)

ALGOS: dict[str, tuple[type[BaseAlgorithm], str, dict[str, Any]]] = {
    "PPO": (PPO, "CartPole-v1", {"n_steps": 32, "batch_size": 32, "n_epochs": 1}),
    "SAC": (SAC, "Pendulum-v1", {"learning_starts": 20, "buffer_size": 300, "batch_size": 16}),
    "DQN": (DQN, "CartPole-v1", {"learning_starts": 20, "buffer_size": 300, "batch_size": 16}),
}

unpickled: list[str] = []


def _record_unpickling(tag: str) -> str:
    unpickled.append(tag)
    return tag


class Tripwire:
    """An object whose unpickling is recorded: proof that loading did or did not run code from the bucket."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return _record_unpickling, ("tripwire",)


def trained(name: str, **extra: Any) -> BaseAlgorithm:
    cls, env_id, kwargs = ALGOS[name]
    options = {"seed": 0, "policy_kwargs": {"net_arch": [16]}, **kwargs, **extra}
    model = cls("MlpPolicy", gymnasium.make(env_id), **options)
    model.learn(64)
    return model


def same_actions(a: BaseAlgorithm, b: BaseAlgorithm) -> bool:
    rng = np.random.default_rng(0)
    space = a.observation_space
    obs = rng.uniform(np.maximum(space.low, -3), np.minimum(space.high, 3), (32, *space.shape)).astype(np.float32)
    return bool(np.array_equal(a.predict(obs, deterministic=True)[0], b.predict(obs, deterministic=True)[0]))


@pytest.mark.parametrize("name", list(ALGOS))
def test_round_trip_predicts_the_same_and_keeps_learning(name: str, tmp_path: Path) -> None:
    cls, env_id, _ = ALGOS[name]
    model = trained(name)
    off_policy = name != "PPO"
    url = f"memory://sb3/{name}" if name != "SAC" else str(tmp_path / "run")
    info = save_model(model, url, model.num_timesteps, include_replay_buffer=off_policy)
    assert not any(m.pickled for m in info.members.values())
    assert SnapshotStore(url).load(keys=["data_pickled"]) == {"data_pickled": {}}  # everything had a safe form
    restored = load_model(cls, url, env=gymnasium.make(env_id))
    assert same_actions(model, restored)
    assert restored.num_timesteps == model.num_timesteps
    if off_policy:
        assert (restored.replay_buffer.pos, restored.replay_buffer.full) == (64, False)
        np.testing.assert_array_equal(restored.replay_buffer.observations, model.replay_buffer.observations)
        np.testing.assert_array_equal(restored.replay_buffer.actions, model.replay_buffer.actions)
    for a, b in zip(model.policy.parameters(), restored.policy.parameters(), strict=True):
        assert torch.equal(a, b)
    restored.learn(32, reset_num_timesteps=False)
    assert restored.num_timesteps == model.num_timesteps + 32
    after = list(restored.policy.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(model.policy.parameters(), after, strict=True)), "no training"


@pytest.mark.parametrize("name", list(ALGOS))
def test_exported_zip_loads_in_sb3_itself(name: str) -> None:
    cls, _, _ = ALGOS[name]
    model = trained(name)
    store = SnapshotStore(f"memory://sb3-export/{name}")
    save_model(model, store, 7)
    export_sb3_zip(store, 7, f"memory://exports/{name}.zip")
    with fsspec.open(f"memory://exports/{name}.zip", "rb") as f:
        loaded = cls.load(f)
    assert same_actions(model, loaded)
    assert loaded.num_timesteps == model.num_timesteps


def test_pickled_data_entries_never_run_without_allow_pickle() -> None:
    model = trained("PPO", learning_rate=lambda progress: 3e-4 * progress)
    model.tripwire = Tripwire()  # type: ignore[attr-defined]
    store = SnapshotStore("memory://sb3/pickled")
    save_model(model, store, 1)
    unpickled.clear()
    # the lambda schedules are rebuilt from PPO's defaults (test_sb3_nopickle.py); the tripwire is refused
    with pytest.raises(UnsafeLoadError, match="tripwire") as exc, pytest.warns(UserWarning, match="lr_schedule"):
        load_model(PPO, store)
    assert "lr_schedule" not in str(exc.value) and store.url in str(exc.value)
    policy = store.load(keys=["policy"])["policy"]  # what an inference host does
    assert torch.equal(policy["action_net.weight"], model.policy.state_dict()["action_net.weight"])
    custom = {"lr_schedule": lambda _: 1e-4, "learning_rate": 1e-4, "tripwire": None}
    assert same_actions(model, load_model(PPO, store, custom_objects=custom))
    assert unpickled == []
    load_model(PPO, store, allow_pickle=True)
    assert unpickled == ["tripwire"]


def test_load_sb3_zip_reads_the_policy_lazily_from_any_url() -> None:
    model = trained("SAC", policy_kwargs={"net_arch": [256, 256]})  # optimizer state outweighs the 64 KiB tail read
    model.tripwire = Tripwire()  # type: ignore[attr-defined]
    url = "countmem://sb3-zips/sac.zip"
    with fsspec.open(url, "wb") as f:
        model.save(f)
    raw = fsspec.filesystem("countmem").cat_file(url)
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        needed = sum(i.compress_size for i in z.infolist() if i.filename in ("data", "policy.pth"))
    unpickled.clear()
    counting_fs.CountingMemoryFileSystem.reset_counts()
    z_ = load_sb3_zip(url)
    # data and the policy, plus the 64 KiB tail read that finds the central directory; not the optimizers
    assert counting_fs.CountingMemoryFileSystem.bytes_read <= needed + 66 * 1024 < len(raw) / 2
    assert set(z_.params) == {"policy"}
    for key, value in model.policy.state_dict().items():
        assert torch.equal(z_.params["policy"][key], value)
    assert {"observation_space", "lr_schedule", "tripwire"} <= set(z_.skipped)
    assert z_.data["num_timesteps"] == model.num_timesteps and z_.sb3_version
    z_ = load_sb3_zip(url, params=None, custom_objects={"tripwire": "replaced"})
    assert z_.data["tripwire"] == "replaced" and "actor.optimizer" in z_.params
    assert z_.pytorch_variables is not None and "log_ent_coef" in z_.pytorch_variables
    assert unpickled == []
    z_ = load_sb3_zip(url, allow_pickle=True)
    assert z_.data["observation_space"] == model.observation_space and unpickled == ["tripwire"]
    with pytest.raises(KeyError, match="no state dict 'nope'"):
        load_sb3_zip(url, params=["nope"])
    with pytest.raises(FileNotFoundError, match=r"countmem://sb3-zips/missing\.zip"):
        load_sb3_zip("countmem://sb3-zips/missing.zip")


def test_snapshot_callback_saves_model_and_shared_buffer_chunks() -> None:
    store = SnapshotStore("memory://sb3/callback")
    model = DQN("MlpPolicy", gymnasium.make("CartPole-v1"), learning_starts=20, buffer_size=400, seed=0)
    callback = SnapshotCallback(store, save_freq=40, include_replay_buffer=True)
    model.learn(120, callback=callback)
    assert store.itrs() == [40, 80, 120] == callback.saved
    restored = load_model(DQN, store, 80, env=gymnasium.make("CartPole-v1"))
    # SB3 calls the callback after env.step, before it stores the transition: 79 transitions at step 80
    assert restored.replay_buffer.pos == 79 and restored.num_timesteps == 80
    assert all(store.info(i).refs for i in store.itrs())


def test_snapshot_callback_async_saving() -> None:
    model = trained("PPO")
    url = "memory://sb3/callback-async"
    callback = SnapshotCallback(url, save_freq=16, async_saving=True)
    model.learn(64, callback=callback, reset_num_timesteps=False)
    store = SnapshotStore(url)
    assert store.itrs() == callback.saved == [80, 96, 112, 128]
    assert same_actions(model, load_model(PPO, store))
    with pytest.raises(ValueError, match="save_freq"):
        SnapshotCallback(url, save_freq=0)
