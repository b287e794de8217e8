"""A small deterministic training job for the preemption tests.

Usage: trainer.py URL OPTIONS_JSON UNTIL [SAVE_EVERY]. Resumes from URL (``bucketsnap.resume``), trains an MLP
with Adam up to itr UNTIL, saves with ``save_async`` every SAVE_EVERY itrs, and handles SIGTERM with
``bucketsnap.on_preemption``. Prints, flushed, one line per event: ``resumed <itr|none>``, ``step <itr>``
(after each completed itr), ``saving <itr>`` (just before ``save_async``), ``committed <itr>``, ``done <itr>``.

Each itr's batch is drawn from a generator seeded by the itr, so an interrupted and resumed run ends with the
same weights, bit for bit, as :func:`train` run straight through.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

import torch
from torch import nn

import bucketsnap

HIDDEN = 768
FILLER = 2_000_000  # floats saved beside the model, so that each upload takes a while


_print_lock = threading.Lock()


def emit(line: str) -> None:
    """One whole line on stdout: the main thread and the save callbacks must not interleave."""
    with _print_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def make() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(32, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 4))
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def step(model: nn.Module, optimizer: torch.optim.Optimizer, itr: int) -> None:
    """Forward and backward on itr's batch; the caller applies ``optimizer.step()``."""
    generator = torch.Generator().manual_seed(itr)
    x = torch.randn(64, 32, generator=generator)
    y = torch.randn(64, 4, generator=generator)
    optimizer.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()


def train(until: int) -> dict[str, Any]:
    """The model's state dict after itrs 0..until, straight through (the reference for the tests)."""
    model, optimizer = make()
    for itr in range(until + 1):
        step(model, optimizer, itr)
        optimizer.step()
    return model.state_dict()


def main() -> None:
    url, options, until = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    save_every = int(sys.argv[4]) if len(sys.argv) > 4 else 10
    model, optimizer = make()
    filler = torch.randn(FILLER, generator=torch.Generator().manual_seed(1))
    store = bucketsnap.SnapshotStore(url, storage_options=options, part_size=5 * 2**20)
    done, state = bucketsnap.resume(store, {"model": model.state_dict(), "optim": optimizer.state_dict()})
    if done is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optim"])
    emit(f"resumed {done if done is not None else 'none'}")
    last = -1 if done is None else done

    def snapshot() -> dict[str, Any]:
        return {"model": model.state_dict(), "optim": optimizer.state_dict(), "itr": last, "filler": filler}

    def report(future: Any) -> None:
        if future.exception() is None:
            emit(f"committed {future.result().itr}")

    with bucketsnap.on_preemption(store, snapshot, itr_fn=lambda: last, signals=[15]) as handler:
        for itr in range(last + 1, until + 1):
            step(model, optimizer, itr)
            with handler.hold():  # the update and its itr change together
                optimizer.step()
                last = itr
            emit(f"step {itr}")
            if itr % save_every == 0:
                emit(f"saving {itr}")
                store.save_async(itr, snapshot()).add_done_callback(report)
            time.sleep(0.005)
    store.flush()
    if until not in store.itrs():
        store.save(until, snapshot())
    emit(f"done {until}")
    store.close()


if __name__ == "__main__":
    main()
