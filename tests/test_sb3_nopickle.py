"""Every SB3 and sb3-contrib algorithm saves and loads with no pickle executed, against SB3's own save and load.

Each load that is meant to need no pickle runs under ``no_unpickling()``: pickle's and cloudpickle's loaders
raise while it runs, so a load that unpickled anything would fail here, not merely be slower.
"""

from __future__ import annotations

import contextlib
import copy
import io
import pickle
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import fsspec
import gymnasium
import numpy as np
import pytest
import torch
from gymnasium import spaces
from sb3_contrib import ARS, QRDQN, TQC, TRPO, CrossQ, MaskablePPO, RecurrentPPO
from sb3_contrib.common.envs import InvalidActionEnvDiscrete
from stable_baselines3 import A2C, DDPG, DQN, PPO, SAC, TD3, HerReplayBuffer
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.envs import BitFlippingEnv
from stable_baselines3.common.noise import (
    NormalActionNoise,
    OrnsteinUhlenbeckActionNoise,
    VectorizedActionNoise,
)
from stable_baselines3.common.utils import LinearSchedule, get_linear_fn, get_schedule_fn
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

from bucketsnap import SnapshotStore, UnsafeLoadError
from bucketsnap.integrations.sb3 import (
    SnapshotCallback,
    export_sb3_zip,
    load_model,
    load_sb3_zip,
    load_vec_normalize,
    save_model,
)

OFF = {"learning_starts": 8, "buffer_size": 200, "batch_size": 8, "train_freq": 4}
ON = {"n_steps": 16, "batch_size": 16, "n_epochs": 1}
TINY = {"net_arch": [8]}


class DictEnv(gymnasium.Env):  # type: ignore[type-arg]
    """A tiny env with a Dict observation (a Box and a Discrete) and a Discrete or Box action."""

    def __init__(self, continuous: bool = False) -> None:
        self.observation_space = spaces.Dict(
            {"pos": spaces.Box(-1.0, 1.0, (2,), np.float32), "flag": spaces.Discrete(3)}
        )
        self.action_space = spaces.Box(-1.0, 1.0, (1,), np.float32) if continuous else spaces.Discrete(2)
        self.t = 0

    def _obs(self) -> dict[str, Any]:
        return {"pos": self.np_random.uniform(-1, 1, 2).astype(np.float32), "flag": int(self.np_random.integers(3))}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        super().reset(seed=seed)
        self.t = 0
        return self._obs(), {}

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        self.t += 1
        return self._obs(), float(np.sum(action)), False, self.t >= 10, {}


def cartpole() -> gymnasium.Env:  # type: ignore[type-arg]
    return gymnasium.make("CartPole-v1")


def pendulum() -> gymnasium.Env:  # type: ignore[type-arg]
    return gymnasium.make("Pendulum-v1")


def masked() -> gymnasium.Env:  # type: ignore[type-arg]
    return InvalidActionEnvDiscrete(dim=4, n_invalid_actions=1)


# name: (class, policy, env factory, constructor options)
ALGOS: dict[str, tuple[type[BaseAlgorithm], str, Callable[[], Any], dict[str, Any]]] = {
    "PPO": (PPO, "MlpPolicy", cartpole, {**ON, "policy_kwargs": TINY}),
    "A2C": (A2C, "MlpPolicy", cartpole, {"n_steps": 4, "policy_kwargs": TINY}),
    "A2C-Dict": (A2C, "MultiInputPolicy", DictEnv, {"n_steps": 4, "policy_kwargs": TINY}),
    "DQN": (DQN, "MlpPolicy", cartpole, {**OFF, "policy_kwargs": TINY}),
    "SAC-Dict": (SAC, "MultiInputPolicy", lambda: DictEnv(continuous=True), {**OFF, "policy_kwargs": TINY}),
    "TD3": (
        TD3,
        "MlpPolicy",
        pendulum,
        {**OFF, "policy_kwargs": TINY, "action_noise": NormalActionNoise(np.zeros(1), np.full(1, 0.1))},
    ),
    "DDPG": (
        DDPG,
        "MlpPolicy",
        pendulum,
        {
            **OFF,
            "policy_kwargs": TINY,
            "action_noise": OrnsteinUhlenbeckActionNoise(
                np.zeros(1), np.full(1, 0.2), theta=0.3, initial_noise=np.full(1, 0.05)
            ),
        },
    ),
    "QRDQN": (QRDQN, "MlpPolicy", cartpole, {**OFF, "policy_kwargs": {**TINY, "n_quantiles": 5}}),
    "TQC": (TQC, "MlpPolicy", pendulum, {**OFF, "policy_kwargs": {**TINY, "n_quantiles": 5}}),
    "RecurrentPPO": (RecurrentPPO, "MlpLstmPolicy", cartpole, {**ON, "policy_kwargs": {**TINY, "lstm_hidden_size": 8}}),
    "TRPO": (TRPO, "MlpPolicy", cartpole, {"n_steps": 16, "batch_size": 16, "policy_kwargs": TINY}),
    "ARS": (ARS, "LinearPolicy", cartpole, {"n_delta": 2}),
    "CrossQ": (CrossQ, "MlpPolicy", pendulum, {**OFF, "policy_kwargs": TINY}),
    "MaskablePPO": (MaskablePPO, "MlpPolicy", masked, {**ON, "policy_kwargs": TINY}),
}


def _refuse(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("a pickle was loaded during a load that must need no pickle")


class _RefusingUnpickler(pickle.Unpickler):
    def load(self) -> Any:
        _refuse()


@contextlib.contextmanager
def no_unpickling() -> Iterator[None]:
    """pickle's and cloudpickle's loaders raise while this runs, and so does torch.load unless weights_only=True
    (torch's own unpickler of tensors and plain containers, which imports and calls nothing else)."""
    torch_load = torch.load

    def weights_only_load(*args: Any, weights_only: bool | None = None, **kwargs: Any) -> Any:
        if weights_only is not True:
            _refuse()
        return torch_load(*args, weights_only=True, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        for module in (pickle, cloudpickle):
            mp.setattr(module, "loads", _refuse)
            mp.setattr(module, "load", _refuse)
        mp.setattr(pickle, "Unpickler", _RefusingUnpickler)
        mp.setattr(torch, "load", weights_only_load)
        yield


def test_no_unpickling_catches_a_pickled_entry() -> None:
    """The tripwire itself: a load that unpickles fails under no_unpickling()."""
    model = PPO("MlpPolicy", cartpole(), **ON, policy_kwargs=TINY, learning_rate=lambda p: 1e-3 * p)
    save_model(model, "memory://nopickle/tripwire", 0)
    with no_unpickling(), pytest.raises(AssertionError, match="a pickle was loaded"):
        load_model(PPO, "memory://nopickle/tripwire", allow_pickle=True)


def fixed_obs(space: spaces.Space[Any], n: int = 16) -> Any:
    space.seed(0)
    if isinstance(space, spaces.Dict):
        samples = [space.sample() for _ in range(n)]
        return {key: np.stack([s[key] for s in samples]) for key in space.spaces}
    if not isinstance(space, spaces.Box):
        return np.stack([space.sample() for _ in range(n)])
    low, high = np.maximum(space.low, -3), np.minimum(space.high, 3)
    return np.random.default_rng(0).uniform(low, high, (n, *space.shape)).astype(np.float32)


def actions(model: BaseAlgorithm, obs: Any) -> np.ndarray:
    return model.predict(obs, deterministic=True)[0]  # type: ignore[no-any-return]


def trained(name: str, **extra: Any) -> BaseAlgorithm:
    cls, policy, make_env, options = ALGOS[name]
    model = cls(policy, make_env(), seed=0, **copy.deepcopy({**options, **extra}))  # SB3 edits policy_kwargs
    model.learn(32)
    return model


def write_sb3_zip(model: BaseAlgorithm, url: str, storage_options: dict[str, Any] | None = None) -> None:
    buf = io.BytesIO()
    model.save(buf)
    with fsspec.open(url, "wb", **(storage_options or {})) as f:
        f.write(buf.getvalue())


def sb3_load(cls: type[BaseAlgorithm], url: str, storage_options: dict[str, Any] | None = None) -> BaseAlgorithm:
    with fsspec.open(url, "rb", **(storage_options or {})) as f:
        return cls.load(io.BytesIO(f.read()))  # SB3 takes a path or an io file, not fsspec's


@pytest.mark.parametrize("name", list(ALGOS))
def test_every_algorithm_round_trips_without_pickle_and_matches_sb3_both_ways(name: str) -> None:
    cls, _, make_env, _ = ALGOS[name]
    model = trained(name)
    obs = fixed_obs(model.observation_space)
    expected = actions(model, obs)
    off_policy = hasattr(model, "replay_buffer")
    run = f"memory://nopickle/{name}"
    info = save_model(model, run, model.num_timesteps, include_replay_buffer=off_policy)
    assert not any(m.pickled for m in info.members.values())
    assert SnapshotStore(run).load(keys=["data_pickled"]) == {"data_pickled": {}}

    with no_unpickling():
        restored = load_model(cls, run, env=make_env())
        predictor = load_model(cls, run)  # an inference host: no env
    np.testing.assert_array_equal(actions(restored, obs), expected)
    np.testing.assert_array_equal(actions(predictor, obs), expected)
    assert restored.num_timesteps == model.num_timesteps
    if off_policy:  # the replay buffer came back too (a DictReplayBuffer for SAC-Dict)
        assert (restored.replay_buffer.pos, restored.replay_buffer.full) == (model.replay_buffer.pos, False)
        saved, back = model.replay_buffer.observations, restored.replay_buffer.observations
        for key in saved if isinstance(saved, dict) else [None]:
            np.testing.assert_array_equal(back[key] if key else back, saved[key] if key else saved)

    # SB3 <- bucketsnap: SB3's own load of the exported zip predicts the same
    export_sb3_zip(run, "last", f"memory://nopickle/{name}-export.zip")
    np.testing.assert_array_equal(actions(sb3_load(cls, f"memory://nopickle/{name}-export.zip"), obs), expected)

    # bucketsnap <- SB3: the zip SB3 wrote, read once trusting it, then kept in a run that loads without pickle
    write_sb3_zip(model, f"memory://nopickle/{name}-sb3.zip")
    by_sb3 = sb3_load(cls, f"memory://nopickle/{name}-sb3.zip")
    imported = load_sb3_zip(f"memory://nopickle/{name}-sb3.zip", params=None, allow_pickle=True).to_model(cls)
    np.testing.assert_array_equal(actions(imported, obs), actions(by_sb3, obs))
    # the spaces' random generators go on as SB3's pickle keeps them (off-policy warm-up actions are sampled)
    for space in ("action_space", "observation_space"):
        a, b = getattr(restored, space).sample(), getattr(by_sb3, space).sample()
        assert str(a) == str(b), space
    save_model(imported, run, model.num_timesteps + 1)
    with no_unpickling():
        converted = load_model(cls, run)
    np.testing.assert_array_equal(actions(converted, obs), actions(by_sb3, obs))

    # training goes on from the restored model
    before = [p.detach().clone() for p in restored.policy.parameters()]
    restored.learn(16, reset_num_timesteps=False)
    assert restored.num_timesteps >= model.num_timesteps + 16
    assert any(not torch.equal(a, b) for a, b in zip(before, restored.policy.parameters(), strict=True))


def test_dict_observations_keep_their_ordered_dict_and_tuple_spaces_round_trip() -> None:
    model = trained("A2C-Dict")
    assert isinstance(model._last_obs, OrderedDict)
    model.extra_space = spaces.Tuple((spaces.Discrete(4), spaces.Box(0, 1, (3,))))  # type: ignore[attr-defined]
    save_model(model, "memory://nopickle/dict", 1)
    with no_unpickling():
        restored = load_model(A2C, "memory://nopickle/dict", force_reset=False)
    assert isinstance(restored._last_obs, OrderedDict) and list(restored._last_obs) == list(model._last_obs)
    for key, value in model._last_obs.items():
        np.testing.assert_array_equal(restored._last_obs[key], value)
    assert restored.observation_space == model.observation_space
    assert restored.extra_space == model.extra_space  # type: ignore[attr-defined]


def test_a_her_model_loads_without_pickle() -> None:
    env = BitFlippingEnv(n_bits=4)
    her = {"n_sampled_goal": 2, "goal_selection_strategy": "future"}
    model = DQN("MultiInputPolicy", env, replay_buffer_class=HerReplayBuffer, replay_buffer_kwargs=her, **OFF,
                policy_kwargs=TINY, seed=0)  # fmt: skip
    model.learn(32)
    save_model(model, "memory://nopickle/her", 32)
    with no_unpickling():
        restored = load_model(DQN, "memory://nopickle/her", env=BitFlippingEnv(n_bits=4))
    obs = fixed_obs(model.observation_space)
    np.testing.assert_array_equal(actions(restored, obs), actions(model, obs))
    assert isinstance(restored.replay_buffer, HerReplayBuffer)
    restored.learn(16, reset_num_timesteps=False)


def test_ars_weights_are_a_tensor_member() -> None:
    model = trained("ARS")
    assert isinstance(model.weights, torch.Tensor)
    save_model(model, "memory://nopickle/ars", 1)
    with no_unpickling():
        restored = load_model(ARS, "memory://nopickle/ars", env=cartpole())
    assert torch.equal(restored.weights, model.weights)


def test_action_noise_is_rebuilt_with_its_parameters_and_state() -> None:
    td3, ddpg = trained("TD3"), trained("DDPG")
    assert isinstance(ddpg.action_noise, OrnsteinUhlenbeckActionNoise)
    ddpg.action_noise.noise_prev = np.full(1, 0.42)
    vec_env = make_vec_env("Pendulum-v1", n_envs=2, seed=0)
    noise = VectorizedActionNoise(NormalActionNoise(np.zeros(1), np.full(1, 0.3)), n_envs=2)
    vectorized = TD3("MlpPolicy", vec_env, seed=0, action_noise=noise, **OFF, policy_kwargs=TINY)
    vectorized.learn(16)
    for name, model in (("td3", td3), ("ddpg", ddpg), ("vec", vectorized)):
        save_model(model, f"memory://nopickle/noise-{name}", 1)
    with no_unpickling():
        loaded = {
            name: load_model(cls, f"memory://nopickle/noise-{name}")
            for name, cls in (("td3", TD3), ("ddpg", DDPG), ("vec", TD3))
        }
    normal = loaded["td3"].action_noise
    assert type(normal) is NormalActionNoise and normal._dtype is np.float32
    np.testing.assert_array_equal(normal._sigma, np.full(1, 0.1))
    ou = loaded["ddpg"].action_noise
    assert type(ou) is OrnsteinUhlenbeckActionNoise and (ou._theta, ou._dt) == (0.3, 1e-2)
    np.testing.assert_array_equal(ou.noise_prev, np.full(1, 0.42))  # the process's state, not a reset one
    np.testing.assert_array_equal(ou.initial_noise, np.full(1, 0.05))
    vec = loaded["vec"].action_noise
    assert type(vec) is VectorizedActionNoise and len(vec.noises) == 2
    assert all(type(n) is NormalActionNoise and n._sigma[0] == 0.3 for n in [vec.base_noise, *vec.noises])
    np.random.seed(3)
    a = ddpg.action_noise()
    np.random.seed(3)
    np.testing.assert_array_equal(ou(), a)  # the same next noise


def test_vec_normalize_statistics_are_saved_and_restored_as_sb3_does(tmp_path: Path) -> None:
    def venv() -> VecNormalize:
        return VecNormalize(DummyVecEnv([DictEnv]), norm_obs_keys=["pos"], clip_obs=5.0, gamma=0.9)

    model = A2C("MultiInputPolicy", venv(), seed=0, n_steps=4, policy_kwargs=TINY)
    model.learn(40)
    trained_env = model.get_vec_normalize_env()
    assert trained_env is not None and trained_env.obs_rms["pos"].count > 40
    save_model(model, "memory://nopickle/vecnorm", 40)
    with no_unpickling():
        restored = load_model(A2C, "memory://nopickle/vecnorm", env=venv())
        alone = load_vec_normalize("memory://nopickle/vecnorm", DummyVecEnv([DictEnv]))
    trained_env.save(tmp_path / "vecnormalize.pkl")  # what SB3's CheckpointCallback(save_vecnormalize=True) does
    by_sb3 = VecNormalize.load(str(tmp_path / "vecnormalize.pkl"), DummyVecEnv([DictEnv]))
    obs = fixed_obs(DictEnv().observation_space, 4)
    for env in (restored.get_vec_normalize_env(), alone):
        assert env is not None
        np.testing.assert_array_equal(env.obs_rms["pos"].mean, by_sb3.obs_rms["pos"].mean)
        np.testing.assert_array_equal(env.obs_rms["pos"].var, by_sb3.obs_rms["pos"].var)
        assert env.obs_rms["pos"].count == by_sb3.obs_rms["pos"].count
        assert env.ret_rms.var == by_sb3.ret_rms.var and (env.clip_obs, env.gamma) == (5.0, 0.9)
        for key, value in by_sb3.normalize_obs(obs).items():
            np.testing.assert_array_equal(env.normalize_obs(obs)[key], value)
    restored.learn(8, reset_num_timesteps=False)
    with pytest.raises(ValueError, match=r"memory://nopickle/vecnorm/.*does not fit this env: `norm_obs_keys`"):
        load_vec_normalize("memory://nopickle/vecnorm", DummyVecEnv([cartpole]))
    with pytest.raises(ValueError, match=r"normalised the observation keys \['pos'\], this env's no observations"):
        load_model(A2C, "memory://nopickle/vecnorm", env=VecNormalize(DummyVecEnv([DictEnv]), norm_obs=False))

    box = PPO("MlpPolicy", VecNormalize(DummyVecEnv([cartpole])), seed=0, **ON, policy_kwargs=TINY)
    box.learn(16)
    save_model(box, "memory://nopickle/vecnorm-box", 16)
    with no_unpickling():
        alone = load_vec_normalize("memory://nopickle/vecnorm-box", DummyVecEnv([cartpole]))
    box_env = box.get_vec_normalize_env()
    assert box_env is not None and box_env.obs_rms.count == alone.obs_rms.count > 16
    np.testing.assert_array_equal(alone.obs_rms.var, box_env.obs_rms.var)

    save_model(trained("A2C"), "memory://nopickle/plain", 0)
    with pytest.raises(KeyError, match=r"memory://nopickle/plain.* holds no VecNormalize statistics"):
        load_vec_normalize("memory://nopickle/plain", DummyVecEnv([cartpole]))


def test_schedule_objects_are_data_and_closures_are_rebuilt_from_the_defaults() -> None:
    lr, clip = LinearSchedule(1e-3, 1e-4, 0.5), LinearSchedule(0.3, 0.1, 1.0)
    model = trained("PPO", learning_rate=lr, clip_range=clip)
    save_model(model, "memory://nopickle/schedules", 1)
    with no_unpickling(), warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing rebuilt, nothing to warn about
        restored = load_model(PPO, "memory://nopickle/schedules", env=cartpole())
    for p in (1.0, 0.7, 0.2):
        assert restored.lr_schedule(p) == model.lr_schedule(p) and restored.clip_range(p) == model.clip_range(p)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # SB3 says its schedule functions are deprecated
        lr_fn, clip_fn = get_linear_fn(1e-3, 1e-4, 0.5), get_schedule_fn(get_linear_fn(0.3, 0.1, 1.0))
    model = trained("PPO", learning_rate=lr_fn, clip_range=clip_fn)  # the closures of SB3's own functions
    save_model(model, "memory://nopickle/sb3-closures", 1)
    assert SnapshotStore("memory://nopickle/sb3-closures").load(keys=["data_pickled"])["data_pickled"] == {}
    with no_unpickling(), warnings.catch_warnings():
        warnings.simplefilter("error")
        restored = load_model(PPO, "memory://nopickle/sb3-closures", env=cartpole())
    for p in (1.0, 0.7, 0.2):
        assert restored.lr_schedule(p) == model.lr_schedule(p) and restored.clip_range(p) == model.clip_range(p)

    model = trained("PPO", learning_rate=lambda p: 1e-3 * p, clip_range=lambda p: 0.1 + 0.1 * p)
    obs = fixed_obs(model.observation_space)
    save_model(model, "memory://nopickle/closures", 1)
    with no_unpickling(), pytest.warns(UserWarning, match=r"rebuilt from PPO's defaults \(learning_rate=0.0003, "):
        restored = load_model(PPO, "memory://nopickle/closures", env=cartpole())
    assert restored.lr_schedule(0.5) == 3e-4 and restored.clip_range(0.5) == 0.2  # PPO's own defaults
    np.testing.assert_array_equal(actions(restored, obs), actions(model, obs))
    restored.learn(16, reset_num_timesteps=False)
    given = {"learning_rate": lambda p: 2e-3 * p, "clip_range": 0.25}
    with no_unpickling(), warnings.catch_warnings():
        warnings.simplefilter("error")
        restored = load_model(PPO, "memory://nopickle/closures", custom_objects=given)
    assert restored.lr_schedule(0.5) == 1e-3 and restored.clip_range(0.5) == 0.25  # lr_schedule follows lr


def test_other_unpicklable_entries_are_still_refused() -> None:
    model = trained("PPO")
    model.custom = OrderedDict(fn=lambda: 1)  # type: ignore[attr-defined]
    save_model(model, "memory://nopickle/refused", 1)
    with no_unpickling(), pytest.raises(UnsafeLoadError, match=r"memory://nopickle/refused.*custom"):
        load_model(PPO, "memory://nopickle/refused")


def test_an_sb3_zip_read_without_pickle_refuses_to_build_a_model() -> None:
    model = trained("PPO")
    write_sb3_zip(model, "memory://nopickle/ppo.zip")
    with no_unpickling():
        archive = load_sb3_zip("memory://nopickle/ppo.zip", params=None)
    assert {"observation_space", "policy_class"} <= set(archive.skipped)
    with pytest.raises(UnsafeLoadError, match=r"memory://nopickle/ppo\.zip: SB3 cloudpickled .*allow_pickle=True"):
        archive.to_model(PPO)
    archive = load_sb3_zip("memory://nopickle/ppo.zip", allow_pickle=True)  # the policy's state dict only
    with pytest.raises(ValueError, match=r"without the state dicts \['policy.optimizer'\]: read it with params=None"):
        archive.to_model(PPO)


@pytest.mark.s3
def test_round_trip_and_export_on_s3(s3_backend: Any) -> None:
    model = trained("SAC-Dict")
    obs = fixed_obs(model.observation_space)
    store = s3_backend.store("sb3-nopickle")
    save_model(model, store, 32, include_replay_buffer=True)
    with no_unpickling():
        restored = load_model(SAC, store, env=DictEnv(continuous=True))
    np.testing.assert_array_equal(actions(restored, obs), actions(model, obs))
    assert restored.replay_buffer.pos == model.replay_buffer.pos
    zip_url = f"{s3_backend.url('export')}/sac.zip"
    export_sb3_zip(store, "last", zip_url, storage_options=s3_backend.options)
    np.testing.assert_array_equal(actions(sb3_load(SAC, zip_url, s3_backend.options), obs), actions(model, obs))
    sb3_url = f"{s3_backend.url('sb3')}/sac.zip"
    write_sb3_zip(model, sb3_url, s3_backend.options)
    archive = load_sb3_zip(sb3_url, params=None, allow_pickle=True, storage_options=s3_backend.options)
    np.testing.assert_array_equal(actions(archive.to_model(SAC), obs), actions(model, obs))


def test_snapshot_callback_keeps_the_vec_normalize_statistics_of_each_save() -> None:
    """As SB3's CheckpointCallback(save_vecnormalize=True): each snapshot holds the statistics of its step, even
    saved in the background while training goes on updating them in place."""
    seen: dict[int, tuple[np.ndarray, float]] = {}

    class Record(BaseCallback):  # type: ignore[misc]
        def _on_step(self) -> bool:
            if self.n_calls % 8 == 0:
                rms = self.model.get_vec_normalize_env().obs_rms
                seen[self.num_timesteps] = (rms.mean.copy(), rms.count)
            return True

    model = PPO("MlpPolicy", VecNormalize(DummyVecEnv([cartpole])), seed=0, **ON, policy_kwargs=TINY)
    saver = SnapshotCallback("memory://nopickle/callback-vecnorm", 8, async_saving=True)
    model.learn(32, callback=CallbackList([saver, Record()]))
    assert saver.saved == sorted(seen) == [8, 16, 24, 32]
    with no_unpickling():
        for itr, (mean, count) in seen.items():
            env = load_vec_normalize("memory://nopickle/callback-vecnorm", DummyVecEnv([cartpole]), itr)
            np.testing.assert_array_equal(env.obs_rms.mean, mean)
            assert env.obs_rms.count == count


@pytest.mark.parametrize(
    ("field", "name"),
    [
        ("features_extractor_class", "torch.os.system"),  # a module reached through an attribute
        ("features_extractor_class", "torch.hub.load"),  # a torch function that runs code it loads
        ("features_extractor_class", "stable_baselines3.common.utils.os.system"),
        ("features_extractor_class", "torch.nn.modules.module.Module.__init__"),  # not a class
        # classes of an allowed package that SB3 would call, though not of a kind SB3 stores: they open files
        ("features_extractor_class", "stable_baselines3.common.logger.HumanOutputFormat"),
        ("optimizer_class", "stable_baselines3.common.monitor.ResultsWriter"),
    ],
)
def test_a_name_written_into_the_data_member_imports_only_classes_of_the_allowed_packages(
    tmp_path: Path, field: str, name: str
) -> None:
    """Anyone who can write the bucket can edit the plain-JSON data member: a name must never reach os.system,
    torch.hub.load or any other function (found by review: torch.os.system ran a shell command from the
    snapshot), and a space must be a space."""
    from bucketsnap.errors import CorruptSnapshotError

    url = f"memory://sb3-crafted-{tmp_path.name}/run"
    save_model(PPO("MlpPolicy", "CartPole-v1", n_steps=16, batch_size=16), url, 0)
    store = SnapshotStore(url)
    state = store.load("last")
    state["data"]["policy_kwargs"] = {field: {"$sb3": "class", "name": name}}
    store.save(1, state)
    with pytest.raises(CorruptSnapshotError, match="refusing to import"):
        load_model(PPO, url)
    state["data"]["policy_kwargs"] = {}
    state["data"]["observation_space"] = f"touch {tmp_path / 'ran'}"
    store.save(2, state)
    with pytest.raises(CorruptSnapshotError, match="'observation_space' is not a space"):
        load_model(PPO, url)
    assert not (tmp_path / "ran").exists()


def test_a_name_never_makes_the_load_import_a_module() -> None:
    """Importing a module runs its code: a name of an allowed package whose module is not imported yet (here SB3's
    results_plotter, which imports matplotlib and pandas) is refused, and nothing new is imported (found by
    review)."""
    import subprocess
    import sys

    script = """
import sys
from stable_baselines3 import PPO
from bucketsnap import SnapshotStore, CorruptSnapshotError
from bucketsnap.integrations.sb3 import load_model, save_model
url = "memory://sb3-import/run"
save_model(PPO("MlpPolicy", "CartPole-v1", n_steps=16, batch_size=16), url, 0)
store = SnapshotStore(url)
state = store.load("last")
name = "stable_baselines3.common.results_plotter.X"
state["data"]["policy_kwargs"] = {"features_extractor_class": {"$sb3": "class", "name": name}}
store.save(1, state)
before = set(sys.modules)
try:
    load_model(PPO, url)
except CorruptSnapshotError as exc:
    assert "results_plotter" in str(exc), exc
else:
    raise AssertionError("loaded")
new = sorted(m for m in set(sys.modules) - before if "results_plotter" in m or m.startswith(("matplotlib", "pandas")))
assert not new, new
print("refused")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0 and "refused" in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize(
    ("entry", "value"),
    [
        ("env", "venv.__main__:X-v0"),  # SB3 would gym.make it: gymnasium imports the module before the colon
        ("_setup_model", {"$sb3": "class", "name": "torch.nn.modules.linear.Identity"}),  # replaces a method
    ],
)
def test_data_entries_sb3_never_saves_and_a_load_would_act_on_are_refused(
    tmp_path: Path, entry: str, value: Any
) -> None:
    from bucketsnap.errors import CorruptSnapshotError

    url = f"memory://sb3-foreign-{tmp_path.name}/run"
    save_model(PPO("MlpPolicy", "CartPole-v1", n_steps=16, batch_size=16), url, 0)
    store = SnapshotStore(url)
    state = store.load("last")
    state["data"][entry] = value
    store.save(1, state)
    with pytest.raises(CorruptSnapshotError, match=f"holds '{entry}', which SB3 never saves"):
        load_model(PPO, url)
    assert load_model(PPO, url, which=0).n_steps == 16


def test_her_with_the_goal_selection_strategy_enum_loads_without_pickle() -> None:
    from stable_baselines3.her.goal_selection_strategy import GoalSelectionStrategy

    env = BitFlippingEnv(n_bits=4, continuous=True)
    kwargs = {"goal_selection_strategy": GoalSelectionStrategy.FUTURE, "n_sampled_goal": 2}
    model = SAC(
        "MultiInputPolicy", env, replay_buffer_class=HerReplayBuffer, replay_buffer_kwargs=kwargs, learning_starts=10
    )
    url = "memory://sb3-her-enum/run"
    save_model(model, url, 0)
    assert SnapshotStore(url).load("last", keys=["data_pickled"])["data_pickled"] == {}
    loaded = load_model(SAC, url, env=env)
    assert loaded.replay_buffer_kwargs["goal_selection_strategy"] is GoalSelectionStrategy.FUTURE
