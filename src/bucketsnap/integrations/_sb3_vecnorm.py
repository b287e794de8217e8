"""``VecNormalize`` statistics as plain data: the running means and variances, and the wrapper's settings.

SB3 pickles the whole ``VecNormalize`` wrapper (``VecNormalize.save``, ``CheckpointCallback(save_vecnormalize=
True)``) beside the model's zip, which ``model.save`` leaves out. bucketsnap keeps the same statistics in the
model's snapshot, as one member of arrays and numbers, so that a resumed run and an inference host normalise
observations exactly as the saved one did, and nothing is unpickled to get them back.

Trade-off: the wrapper's per-step scratch (``old_obs``, ``old_reward``, the discounted ``returns``) is not kept;
SB3's own ``load`` resets ``returns`` too, and the others are rewritten at the next step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from stable_baselines3.common.running_mean_std import RunningMeanStd
from stable_baselines3.common.vec_env import VecEnv, VecNormalize

__all__ = ["SETTINGS", "apply_vec_normalize", "vec_normalize_state", "wrap"]

#: VecNormalize's constructor arguments that its statistics depend on
SETTINGS = ("training", "norm_obs", "norm_reward", "clip_obs", "clip_reward", "gamma", "epsilon", "norm_obs_keys")


def vec_normalize_state(env: VecNormalize) -> dict[str, Any]:
    """The statistics and settings of ``env``, as arrays, numbers and strings."""
    state: dict[str, Any] = {name: _plain(getattr(env, name, None)) for name in SETTINGS}
    obs_rms = getattr(env, "obs_rms", None)
    if isinstance(obs_rms, dict):  # a Dict space: one per normalised key
        state["obs_rms_keys"] = {str(key): _rms(r) for key, r in obs_rms.items()}
    elif obs_rms is not None:
        state["obs_rms"] = _rms(obs_rms)
    state["ret_rms"] = _rms(env.ret_rms)
    return state


def apply_vec_normalize(state: dict[str, Any], env: VecNormalize, where: str) -> None:
    """Set the saved statistics and settings on ``env``, a VecNormalize over an env of the saved spaces.

    Raises:
        ValueError: ``env`` normalises other observation keys or shapes than the saved one.
    """
    saved: Any = state.get("obs_rms_keys", state.get("obs_rms"))
    current = getattr(env, "obs_rms", None)
    keyed = "obs_rms_keys" in state
    if keyed != isinstance(current, dict) or (keyed and isinstance(current, dict) and set(saved) != set(current)):
        theirs = _describe(current, isinstance(current, dict))
        raise ValueError(
            f"{where}: the saved VecNormalize normalised {_describe(saved, keyed)}, this env's {theirs}; "
            "build the VecNormalize with the same norm_obs and norm_obs_keys"
        )
    for name in SETTINGS:
        setattr(env, name, state[name])
    if keyed and isinstance(current, dict):
        for key, rms in saved.items():
            current[key] = _running(rms, current[key].mean.shape, where)
    elif saved is not None:
        shape = current.mean.shape if isinstance(current, RunningMeanStd) else None
        env.obs_rms = _running(saved, shape, where)  # type: ignore[assignment]
    env.ret_rms = _running(state["ret_rms"], (), where)
    env.returns = np.zeros(env.num_envs)


def wrap(state: dict[str, Any], venv: VecEnv, where: str) -> VecNormalize:
    """A new VecNormalize over ``venv`` with the saved settings and statistics (SB3's ``VecNormalize.load``)."""
    try:
        env = VecNormalize(venv, **{name: state[name] for name in SETTINGS})
    except (ValueError, AssertionError) as exc:  # SB3's checks of the spaces against the settings
        raise ValueError(f"{where}: the saved VecNormalize does not fit this env: {exc}") from exc
    apply_vec_normalize(state, env, where)
    return env


def _rms(rms: RunningMeanStd) -> dict[str, Any]:
    # no copy here: RunningMeanStd rebinds new arrays at each update, and save_async copies the state anyway
    return {"mean": np.asarray(rms.mean), "var": np.asarray(rms.var), "count": float(rms.count)}


def _running(saved: dict[str, Any], shape: tuple[int, ...] | None, where: str) -> RunningMeanStd:
    mean, var = np.asarray(saved["mean"]), np.asarray(saved["var"])
    if shape is not None and mean.shape != tuple(shape):
        raise ValueError(f"{where}: the saved VecNormalize statistics have shape {mean.shape}, this env's {shape}")
    rms = RunningMeanStd(shape=mean.shape)
    rms.mean, rms.var, rms.count = mean.copy(), var.copy(), float(saved["count"])
    return rms


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [str(x) for x in value]
    return value


def _describe(obs_rms: Any, keyed: bool) -> str:
    if obs_rms is None:
        return "no observations"
    if keyed:
        return f"the observation keys {sorted(obs_rms)}"
    return "a Box observation"
