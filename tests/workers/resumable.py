"""A small deterministic training job that resumes from its last snapshot (tests/test_testing_preempt.py).

Usage: ``resumable.py URL [STEPS [SAVE_EVERY [sync|async]]]``. No storage options: the run's environment points
the clients at the test server, as it would a user's script. Each step's batch comes from the global RNG, whose
state is saved with the model and the optimizer, so a killed and resumed run ends bit for bit where an
uninterrupted one does. On SIGTERM ``on_preemption`` writes a final snapshot. With ``RESUMABLE_CRASH_ON_RESUME``
set, a process that finds a snapshot to resume from raises instead (the test of a failing restart).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

import bucketsnap


def train(
    url: str,
    steps: int = 8,
    save_every: int = 2,
    mode: str = "sync",
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train to ``steps`` (resuming from ``url``), save every ``save_every`` steps; the final state."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    store = bucketsnap.SnapshotStore(url, storage_options=storage_options)
    done = -1

    def state() -> dict[str, Any]:
        return {"model": model.state_dict(), "optim": optimizer.state_dict(), "rng": torch.get_rng_state()}

    itr, restored = bucketsnap.resume(store, state())
    if itr is not None:
        if os.environ.get("RESUMABLE_CRASH_ON_RESUME"):
            raise RuntimeError(f"cannot resume from {itr}")
        model.load_state_dict(restored["model"])
        optimizer.load_state_dict(restored["optim"])
        torch.set_rng_state(restored["rng"])
        done = itr
    with bucketsnap.on_preemption(store, state, itr_fn=lambda: done) as handler:
        for step in range(done + 1, steps):
            with handler.hold():  # the batch, the update and the step they belong to change together
                optimizer.zero_grad()
                model(torch.randn(16, 4)).square().mean().backward()
                optimizer.step()
                done = step
            if (step + 1) % save_every == 0:
                if mode == "async":
                    store.save_async(step, state())
                else:
                    store.save(step, state())
    store.close()
    return state()


def main() -> None:
    args = sys.argv[1:]
    train(
        args[0],
        int(args[1]) if len(args) > 1 else 8,
        int(args[2]) if len(args) > 2 else 2,
        args[3] if len(args) > 3 else "sync",
    )


if __name__ == "__main__":
    main()
