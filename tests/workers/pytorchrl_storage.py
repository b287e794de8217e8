"""Builds pytorchrl storages for tests/test_pytorchrl.py; run as a script, restores one in a fresh process.

    python pytorchrl_storage.py <storage options json> <kind> <url> <out.npz> [<kind> <url> <out.npz> ...]

for each triple builds a fresh, empty storage of ``kind``, restores ``last``'s ``replay_buffer`` of the run at
``url`` into it with bucketsnap.buffers.restore_buffer, writes its state (``state_of``) to ``out.npz``, and
goes on training with it (one more transition, one batch).
"""

from __future__ import annotations

import json
import sys
import warnings
from typing import Any, ClassVar

import numpy as np
import torch

warnings.filterwarnings("ignore")

import gym  # noqa: E402  (pytorchrl imports gym; its import prints a notice we do not need)
import pytorchrl as prl  # noqa: E402
from pytorchrl.agent.actors import OffPolicyActor, OnPolicyActor  # noqa: E402
from pytorchrl.agent.actors.memory_networks import GruNet  # noqa: E402
from pytorchrl.agent.storages import (  # noqa: E402
    GAEBuffer,
    NStepReplayBuffer,
    PERBuffer,
    ReplayBuffer,
    VanillaOnPolicyBuffer,
)

N_ENVS = 2
OBS = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
ACT = gym.spaces.Discrete(2)


class Algorithm:
    """The attributes pytorchrl's storages read of their algorithm."""

    update_every = 10
    _update_every = 10
    gamma = 0.99
    gae_lambda = 0.95


class Envs:
    """What pytorchrl's on-policy storages read of the vector of environments."""

    num_envs = N_ENVS
    env_kwargs: ClassVar[dict[str, Any]] = {}


#: Recurrent hidden-state width of the "recurrent" kind's GRU actor.
HIDDEN = 8


def build(kind: str, size: int = 50) -> Any:
    if kind == "recurrent":
        factory = OffPolicyActor.create_factory(
            OBS, ACT, prl.DDQN, recurrent_net=GruNet, recurrent_net_kwargs={"output_size": HIDDEN}
        )
        return ReplayBuffer.create_factory(size)("cpu", factory("cpu"), Algorithm(), None)
    if kind in ("replay", "nstep", "per"):
        actor = OffPolicyActor.create_factory(OBS, ACT, prl.DDQN)("cpu")
        if kind == "nstep":
            return NStepReplayBuffer.create_factory(size, n_step=3)("cpu", actor, Algorithm(), None)
        if kind == "per":
            return PERBuffer.create_factory(size, alpha=0.6, beta=0.4)("cpu", actor, Algorithm(), None)
        return ReplayBuffer.create_factory(size)("cpu", actor, Algorithm(), None)
    actor = OnPolicyActor.create_factory(OBS, ACT, prl.PPO)("cpu")
    cls = GAEBuffer if kind == "gae" else VanillaOnPolicyBuffer
    factory = cls.create_factory(size, gae_lambda=0.95) if kind == "gae" else cls.create_factory(size)
    return factory("cpu", actor, Algorithm(), Envs())


def sample(kind: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One transition as pytorchrl's collectors insert it, recurrent hidden states included."""

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(N_ENVS, *shape, generator=generator)

    hidden = HIDDEN if kind == "recurrent" else 1
    s = {
        prl.OBS: rand(4),
        prl.RHS: rand(hidden) if kind == "recurrent" else torch.zeros(N_ENVS, 1),
        prl.DONE: (rand(1) > 1).float(),
        prl.ACT: torch.randint(0, 2, (N_ENVS, 1), generator=generator).float(),
        prl.REW: rand(1),
        prl.OBS2: rand(4),
        prl.RHS2: rand(hidden) if kind == "recurrent" else torch.zeros(N_ENVS, 1),
        prl.DONE2: (rand(1) > 1).float(),
    }
    if kind in ("onpolicy", "gae"):
        s[prl.VAL] = rand(1)
        s[prl.LOGP] = rand(1)
    return s


def filled(kind: str, transitions: int, size: int = 50, seed: int = 0) -> Any:
    storage = build(kind, size)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(transitions):
        storage.insert_transition(sample(kind, generator))
    if kind == "per":
        storage.before_gradients()  # gives every row, written or not, its default priority
    return storage


def state_of(storage: Any) -> dict[str, np.ndarray]:
    """Everything a storage holds, as arrays: its data fields, counters and pending n-step transitions."""
    out: dict[str, np.ndarray] = {}
    for key, value in storage.data.items():
        for sub, v in value.items() if isinstance(value, dict) else [(None, value)]:
            if v is not None:
                name = f"data/{key}" if sub is None else f"data/{key}/{sub}"
                out[name] = v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
    for name in ("step", "size", "max_size"):
        out[name] = np.asarray(getattr(storage, name))
    for key, pending in getattr(storage, "n_step_buffer", {}).items():
        for i, v in enumerate(pending):
            out[f"n_step/{key}/{i}"] = v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
    return out


if __name__ == "__main__":
    from bucketsnap import SnapshotStore
    from bucketsnap.buffers import restore_buffer

    options = json.loads(sys.argv[1])
    jobs = sys.argv[2:]
    for kind, url, out in zip(jobs[0::3], jobs[1::3], jobs[2::3], strict=True):
        fresh = build(kind)
        restore_buffer(SnapshotStore(url, storage_options=options), fresh)
        np.savez(out, **state_of(fresh))
        # The restored storage goes on working: one more transition and a batch.
        fresh.insert_transition(sample(kind, torch.Generator().manual_seed(1)))
        if kind in ("replay", "nstep"):
            next(iter(fresh.generate_batches(1, 8)))
    print("ok")
