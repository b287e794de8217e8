"""Tiny tianshou 2.x experiments (CartPole-v1, one env, 16-unit nets) for tests/test_tianshou.py.

Run as a script, imports tianshou, reads ``{"url": ..., "options": ..., "base": ...}`` as one JSON line from stdin
and trains PPO with its checkpoints in the bucketsnap run at ``url`` until it is killed (an empty stdin: it exits).

``NUMBA_DISABLE_JIT=1``: tianshou compiles its buffer helpers with numba in every new process, 15-60 s on a
loaded 2-core machine; the plain Python functions behave the same and are what these tests can afford.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

os.environ.setdefault("NUMBA_DISABLE_JIT", "1")

import numpy as np
from tianshou.highlevel.config import OffPolicyTrainingConfig, OnPolicyTrainingConfig
from tianshou.highlevel.env import EnvFactoryRegistered, VectorEnvType
from tianshou.highlevel.experiment import (
    DQNExperimentBuilder,
    Experiment,
    ExperimentConfig,
    PPOExperimentBuilder,
)
from tianshou.highlevel.logger import LoggerFactoryDefault
from tianshou.highlevel.params.algorithm_params import DQNParams

logging.getLogger("tianshou").setLevel(logging.WARNING)

#: Fixed CartPole observations on which greedy actions are compared.
OBS = np.random.default_rng(0).normal(0.0, 0.5, size=(32, 4)).astype(np.float32)


def env_factory() -> EnvFactoryRegistered:
    return EnvFactoryRegistered(task="CartPole-v1", venv_type=VectorEnvType.DUMMY)


def build(
    algo: str,
    base_dir: str,
    *,
    epochs: int = 2,
    env_factory_: Any = None,
    checkpoint_every: int | None = 1,
    **config: Any,
) -> Experiment:
    """A DQN (off-policy) or PPO (on-policy) experiment of ``epochs`` x 100 env steps, one test episode each."""
    config = {
        "persistence_base_dir": base_dir,
        "watch": False,
        "device": "cpu",
        "seed": 3,
        "log_file_enabled": False,
        **config,
    }
    factory = env_factory_ or env_factory()
    builder: Any
    if algo == "dqn":
        builder = DQNExperimentBuilder(
            factory,
            ExperimentConfig(**config),
            OffPolicyTrainingConfig(
                max_epochs=epochs,
                epoch_num_steps=100,
                num_training_envs=1,
                num_test_envs=1,
                test_step_num_episodes=1,
                buffer_size=500,
                batch_size=16,
                collection_step_num_env_steps=10,
                update_step_num_gradient_steps_per_sample=0.1,
            ),
        )
        builder.with_dqn_params(DQNParams(target_update_freq=10)).with_model_factory_default(hidden_sizes=(16,))
    else:
        builder = PPOExperimentBuilder(
            factory,
            ExperimentConfig(**config),
            OnPolicyTrainingConfig(
                max_epochs=epochs,
                epoch_num_steps=100,
                num_training_envs=1,
                num_test_envs=1,
                test_step_num_episodes=1,
                buffer_size=200,
                batch_size=32,
                collection_step_num_env_steps=50,
            ),
        )
        builder.with_actor_factory_default(hidden_sizes=(16,)).with_critic_factory_default(hidden_sizes=(16,))
    builder.with_logger_factory(LoggerFactoryDefault(save_interval=checkpoint_every))
    return builder.with_name(algo).build()  # type: ignore[no-any-return]


def greedy(algorithm: Any) -> np.ndarray:
    """The greedy actions of a DQN or PPO algorithm on :data:`OBS`."""
    policy = algorithm.policy
    net = policy.model if hasattr(policy, "model") else policy.actor
    logits = net(OBS)[0]
    return logits.argmax(-1).detach().numpy()  # type: ignore[no-any-return]


if __name__ == "__main__":
    import json

    from bucketsnap.integrations.tianshou import keep_in_run

    # Imported first, told what to train afterwards: the test starts this process early, so that the slow
    # imports overlap its other tests, and sends the run when it needs it.
    job = json.loads(sys.stdin.readline() or "null")
    if job is not None:
        experiment = keep_in_run(build("ppo", job["base"], epochs=10_000), job["url"], storage_options=job["options"])
        experiment.run()
