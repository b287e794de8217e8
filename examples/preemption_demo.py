"""bucketsnap demo: train, get preempted (SIGKILL), resume from `last`, restore the policy for inference.

1. A training process (REINFORCE on gymnasium's CartPole-v1, plain PyTorch) saves a snapshot every few
   iterations: policy, optimizer, RNG state and a rollout buffer, with the mean return as a metric.
2. Mid-run, during a save, it SIGKILLs itself, as a preempted VM would vanish.
3. A second process calls ``bucketsnap.resume`` and continues from the last committed snapshot.
4. An "inference host" restores only the policy member, prints how many bytes that read against the
   snapshot's size, and runs the greedy policy.

The run is deterministic (the seed is set before the policy is built, episodes are seeded by itr, and the RNG
state is in the snapshot), so the resumed run ends with the same policy as one never killed. It ends with the
``bucketsnap`` commands that look at the run.

Run with ``./scripts/demo.sh`` (local directory ``bucketsnap-demo/``), or on any fsspec URL:
``./scripts/demo.sh --url s3://bucket/demo --endpoint-url http://127.0.0.1:4566``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from bucketsnap import SnapshotStore, resume

ENV_ID = "CartPole-v1"
BUFFER_SIZE = 100_000


def make_policy() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 2))


def storage_options(args: argparse.Namespace) -> dict[str, Any]:
    if args.endpoint_url:
        return {"client_kwargs": {"endpoint_url": args.endpoint_url}}
    return {}


def run_episode(env: gym.Env[Any, Any], policy: nn.Module, *, greedy: bool, seed: int | None = None) -> tuple:
    """One episode without gradients (the log-probabilities are computed afterwards, in one batch)."""
    obs, _ = env.reset(seed=seed)
    observations, actions, rewards = [], [], []
    done = False
    with torch.no_grad():
        while not done:
            logits = policy(torch.as_tensor(obs, dtype=torch.float32))
            action = int(logits.argmax()) if greedy else int(torch.multinomial(logits.softmax(-1), 1))
            observations.append(obs)
            actions.append(action)
            obs, reward, terminated, truncated, _ = env.step(action)
            rewards.append(float(reward))
            done = terminated or truncated
    return observations, actions, rewards


def train(args: argparse.Namespace) -> None:
    """One training process: resume, train, save every few itrs; optionally SIGKILL itself mid-save."""
    store = SnapshotStore(args.url, storage_options=storage_options(args))
    torch.manual_seed(0)  # before the policy's weights are drawn: every run starts from the same ones
    policy = make_policy()
    optimizer = torch.optim.Adam(policy.parameters(), lr=5e-3)
    defaults = {
        "policy": policy.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": torch.get_rng_state(),
        "rollouts": np.zeros((BUFFER_SIZE, 4), dtype=np.float32),
        "rollout_pos": 0,
    }
    resumed = resume(store, defaults)
    state = resumed.state
    policy.load_state_dict(state["policy"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    rollouts, pos = state["rollouts"], state["rollout_pos"]
    where = "fresh run" if resumed.itr is None else f"resumed from itr {resumed.itr}"
    print(f"[train pid {os.getpid()}] {where}; training itrs {resumed.next_itr}..{args.iterations - 1}", flush=True)

    env = gym.make(ENV_ID)
    for itr in range(resumed.next_itr, args.iterations):
        batch_returns, losses = [], []
        for episode in range(8):
            observations, actions, rewards = run_episode(env, policy, greedy=False, seed=itr * 100 + episode)
            returns = torch.tensor(np.cumsum(rewards[::-1])[::-1].copy(), dtype=torch.float32)
            returns = (returns - returns.mean()) / (returns.std() + 1e-8)
            logits = policy(torch.as_tensor(np.array(observations), dtype=torch.float32))
            log_probs = torch.distributions.Categorical(logits=logits).log_prob(torch.tensor(actions))
            losses.append(-(log_probs * returns).sum())
            batch_returns.append(sum(rewards))
            for o in observations:
                rollouts[pos % BUFFER_SIZE] = o
                pos += 1
        optimizer.zero_grad()
        torch.stack(losses).mean().backward()
        optimizer.step()
        mean_return = float(np.mean(batch_returns))

        if itr % args.save_every == 0 or itr == args.iterations - 1:
            if itr == args.kill_at:
                # A preempted VM vanishes whenever it likes: here, in the middle of writing this snapshot.
                threading.Timer(0.005, os.kill, (os.getpid(), signal.SIGKILL)).start()
                print(f"[train pid {os.getpid()}] itr {itr}: SIGKILL arrives during this save", flush=True)
            state = {
                "policy": policy.state_dict(),
                "optimizer": optimizer.state_dict(),
                "rng": torch.get_rng_state(),
                "rollouts": rollouts,
                "rollout_pos": pos,
            }
            info = store.save(itr, state, metrics={"mean_return": mean_return})
            print(f"[train pid {os.getpid()}] itr {itr:3d}  return {mean_return:6.1f}  saved {info.size:,} bytes")
        if itr == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


def infer(args: argparse.Namespace) -> None:
    """An inference host: read only the policy member, never the optimizer or the rollouts."""
    store = SnapshotStore(args.url, storage_options=storage_options(args))
    snapshot = store.open("last")
    before = store.storage.bytes_read
    weights = snapshot["policy"]
    read = store.storage.bytes_read - before
    policy = make_policy()
    policy.load_state_dict(weights)
    env = gym.make(ENV_ID)
    with torch.no_grad():
        returns = [sum(run_episode(env, policy, greedy=True, seed=10_000 + i)[2]) for i in range(10)]
    info = snapshot.info
    others = ", ".join(k for k in info.members if k != "policy")
    print(
        f"[inference] itr {info.itr}: read the policy alone, {read:,} bytes of a {info.size:,}-byte snapshot "
        f"({100 * read / info.size:.2f} %; not read: {others})"
    )
    print(f"[inference] greedy policy return over 10 episodes: {np.mean(returns):.1f} (max 500)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="bucketsnap-demo", help="where runs go: a path or fsspec URL")
    parser.add_argument("--endpoint-url", help="S3 endpoint, e.g. http://127.0.0.1:4566 for LocalStack")
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--save-every", type=int, default=5)
    parser.add_argument("--kill-at", type=int, default=35, help="itr at which the trainer SIGKILLs itself")
    parser.add_argument("--role", choices=["train", "infer"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "train":
        return train(args)
    if args.role == "infer":
        return infer(args)

    started = time.monotonic()
    run_url = f"{args.url.rstrip('/')}/run-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}"
    print(f"bucketsnap demo: run at {run_url}")
    forwarded = ["--url", run_url, "--iterations", str(args.iterations), "--save-every", str(args.save_every)]
    if args.endpoint_url:
        forwarded += ["--endpoint-url", args.endpoint_url]

    first = subprocess.run([sys.executable, __file__, "--role", "train", "--kill-at", str(args.kill_at), *forwarded])
    print(f"[demo] training process exited with {first.returncode} (-9: killed by SIGKILL, like a preemption)")
    store = SnapshotStore(run_url, storage_options=storage_options(args))
    orphans = store.gc(min_age=0, dry_run=True)
    print(
        f"[demo] committed itrs: {store.itrs()}; last = {store.info('last').itr}; "
        f"uncommitted leftovers (ignored by readers, removable by gc): {len(orphans)}"
    )

    second = subprocess.run([sys.executable, __file__, "--role", "train", "--kill-at", "-1", *forwarded])
    if second.returncode != 0:
        sys.exit(f"[demo] resumed training failed with {second.returncode}")
    print(f"[demo] after resume: committed itrs {store.itrs()}")
    store.verify("last")
    subprocess.run([sys.executable, __file__, "--role", "infer", *forwarded], check=True)
    print(json.dumps({"run": run_url, "itrs": store.itrs(), "seconds": round(time.monotonic() - started, 1)}))
    endpoint = f" --endpoint-url {args.endpoint_url}" if args.endpoint_url else ""
    print("[demo] look at the run:")
    for command in ("ls", "show", "verify --all", "restore --key policy -o policy.safetensors"):
        name, _, rest = command.partition(" ")
        print(f"  bucketsnap {name} {run_url}{endpoint}{' ' + rest if rest else ''}")


if __name__ == "__main__":
    main()
