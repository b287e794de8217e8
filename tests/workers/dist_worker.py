"""One rank of a multi-process test of distributed saves (gloo on CPU, rendezvous through a file).

Usage: dist_worker.py SCENARIO RANK WORLD INIT_FILE URL OPTIONS_JSON

Prints one JSON object per line (``{"rank": r, "event": ..., ...}``) for the test to check, and "ready" first.
Scenarios:

    roundtrip  save itr 0, then itrs 1 and 2 with save_async while the training loop all-reduces on the
               default group; every rank re-reads its view of each itr with load_rank
    save       save itr 2 once
    restore    read a snapshot saved at another world size: the policy, and shards rank, rank + WORLD, ...
    errors     a rank failing to serialize, a rank failing to write, ranks disagreeing on keys, an itr that
               exists (through save_async): every rank must raise the same error; then a save that works
    kill       save itr 0; rank 1 SIGKILLs itself halfway through writing itr 1; the others report the error
    preempt    train in lockstep under on_preemption + agree_on_preemption until the test SIGTERMs one rank
    preempt_after_agree, preempt_between_steps
               as preempt, but rank 1 SIGTERMs itself at step 5: inside hold() just after agree_on_preemption
               (which then said "no"), or between two hold() blocks; every rank must save at step 6 together
    landed     commits that landed although something failed after: itr 0 overwritten while rank 0 may not
               delete (a bucket policy denying DeleteObject); itr 1 whose manifest create on rank 0 lands but
               reports an error, and whose re-read fails too
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from bucketsnap import Sharded, SnapshotStore
from bucketsnap._archive import ArchiveWriter
from bucketsnap.distributed import agree_on_preemption, load_rank, shard_keys

#: Seconds a collective waits for a silent rank; a dead peer's closed socket is noticed at once on gloo.
GROUP_TIMEOUT = 30


def emit(rank: int, event: str, **fields: Any) -> None:
    print(json.dumps({"rank": rank, "event": event, **fields}), flush=True)


def state(itr: int, rank: int) -> dict[str, Any]:
    """Replicated policy and step, per-rank optimizer and replay shards: all derived from (itr, rank)."""
    return {
        "policy": {"w": torch.randn(5000, generator=torch.Generator().manual_seed(itr))},
        "optimizer": Sharded({"m": torch.full((300,), float(rank + 10 * itr))}),
        "replay": Sharded(np.arange(100 * rank, 100 * rank + 50, dtype=np.int64) + itr),
        "step": itr,
    }


def check_view(view: dict[str, Any], itr: int, rank: int) -> None:
    expected = state(itr, rank)
    assert torch.equal(view["policy"]["w"], expected["policy"]["w"]), "policy differs"
    assert torch.equal(view["optimizer"]["m"], expected["optimizer"].value["m"]), "optimizer shard differs"
    assert np.array_equal(view["replay"], expected["replay"].value), "replay shard differs"
    assert view["step"] == itr


def error_event(rank: int, itr: int, exc: BaseException) -> None:
    emit(rank, "error", itr=itr, type=type(exc).__name__, message=str(exc))


def roundtrip(store: SnapshotStore, rank: int, world: int) -> None:
    info = store.save(0, state(0, rank), metrics={"itr": 0})
    emit(rank, "saved", itr=0, members=list(info.members), objects=sorted(info.objects()))
    futures = [store.save_async(itr, state(itr, rank), metrics={"itr": itr}) for itr in (1, 2)]
    total = torch.ones(1)
    for _ in range(20):  # the training loop keeps using the default group meanwhile
        dist.all_reduce(total)
    for itr, future in zip((1, 2), futures, strict=True):
        info = future.result(timeout=120)
        emit(rank, "saved", itr=itr, members=list(info.members), objects=sorted(info.objects()))
    store.close()
    for itr in (0, 1, 2):
        check_view(load_rank(store, itr), itr, rank)
    emit(rank, "checked", reduced=float(total.item()), expected=float(world**20))


def save(store: SnapshotStore, rank: int, world: int) -> None:
    info = store.save(2, state(2, rank))
    emit(rank, "saved", itr=2, objects=sorted(info.objects()))


def restore(store: SnapshotStore, rank: int, world: int) -> None:
    info = store.info("last")
    expected = state(info.itr, 0)
    policy = load_rank(store, "last", keys=["policy", "step"])
    assert torch.equal(policy["policy"]["w"], expected["policy"]["w"]) and policy["step"] == info.itr
    names = shard_keys(info, "optimizer")
    mine = names[rank::world]  # this rank takes over shards rank, rank + world, ...
    shards = store.load("last", keys=mine)
    for saved_rank, name in zip(range(rank, len(names), world), mine, strict=True):
        assert torch.equal(shards[name]["m"], state(info.itr, saved_rank)["optimizer"].value["m"]), name
    emit(rank, "restored", itr=info.itr, saved_world=len(names), shards=mine)


def errors(store: SnapshotStore, rank: int, world: int) -> None:
    store.save(0, state(0, rank))
    emit(rank, "saved", itr=0)
    # itr 1: rank 1 holds a value that cannot be serialized (a lock cannot be pickled)
    bad = state(1, rank)
    if rank == 1:
        bad["optimizer"] = Sharded({"m": torch.zeros(3), "lock": threading.Lock()})
    try:
        store.save(1, bad)
    except Exception as exc:
        error_event(rank, 1, exc)
    # itr 2: rank 1 fails while writing its archive, after the others have written theirs
    original = ArchiveWriter.add_encoded
    if rank == 1:

        def failing(self: ArchiveWriter, key: str, encoded: Any) -> Any:
            raise OSError(f"injected write failure on rank {rank}")

        ArchiveWriter.add_encoded = failing  # type: ignore[method-assign]
    try:
        store.save(2, state(2, rank))
    except Exception as exc:
        error_event(rank, 2, exc)
    ArchiveWriter.add_encoded = original  # type: ignore[method-assign]
    # itr 3: rank 1 passes a key the others do not
    try:
        store.save(3, {**state(3, rank), **({"extra": 1} if rank == 1 else {})})
    except Exception as exc:
        error_event(rank, 3, exc)
    # itr 0 again, in the background: it exists
    try:
        store.save_async(0, state(0, rank)).result(timeout=120)
    except Exception as exc:
        error_event(rank, 0, exc)
    store.flush()  # the error was seen through the future: the store does not raise it again
    # the group is still usable after errors that lost no rank
    info = store.save(4, state(4, rank))
    emit(rank, "saved", itr=4, objects=sorted(info.objects()))
    check_view(load_rank(store, 4), 4, rank)
    emit(rank, "checked")


def kill(store: SnapshotStore, rank: int, world: int) -> None:
    store.save(0, state(0, rank))
    emit(rank, "saved", itr=0)
    if rank == 1:
        original = ArchiveWriter.add_encoded
        calls = 0

        def dying(self: ArchiveWriter, key: str, encoded: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 2:  # one member written, the archive half done
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, key, encoded)

        ArchiveWriter.add_encoded = dying  # type: ignore[method-assign]
    try:
        store.save(1, state(1, rank))
        emit(rank, "saved", itr=1)
    except Exception as exc:
        error_event(rank, 1, exc)


def preempt(store: SnapshotStore, rank: int, world: int) -> None:
    from bucketsnap._preemption import on_preemption

    store.save(0, state(0, rank))
    itr = 0
    with on_preemption(
        store, lambda: state(itr, rank), itr_fn=lambda: itr, deadline=60, signals=[signal.SIGTERM]
    ) as handler:
        for _ in range(3000):  # the test signals long before; bounded so that nothing runs forever
            with handler.hold():
                total = torch.ones(1)
                dist.all_reduce(total)  # the step's gradient all-reduce keeps the ranks in lockstep
                itr += 1
                time.sleep(0.02)
                emit(rank, "step", itr=itr)
                agree_on_preemption(handler)
    emit(rank, "not preempted")


def preempt_self(where: str) -> Any:
    """The preempt scenario with the signal sent by rank 1 itself, at a chosen point of step 5."""

    def scenario(store: SnapshotStore, rank: int, world: int) -> None:
        from bucketsnap._preemption import on_preemption

        store.save(0, state(0, rank))
        itr = 0
        with on_preemption(
            store, lambda: state(itr, rank), itr_fn=lambda: itr, deadline=60, signals=[signal.SIGTERM]
        ) as handler:
            for _ in range(50):
                with handler.hold():
                    total = torch.ones(1)
                    dist.all_reduce(total)
                    itr += 1
                    emit(rank, "step", itr=itr)
                    agree_on_preemption(handler)
                    if rank == 1 and itr == 5 and where == "after_agree":
                        os.kill(os.getpid(), signal.SIGTERM)
                if rank == 1 and itr == 5 and where == "between_steps":
                    os.kill(os.getpid(), signal.SIGTERM)
        emit(rank, "not preempted")

    return scenario


def landed(store: SnapshotStore, rank: int, world: int) -> None:
    from bucketsnap import StorageError
    from bucketsnap._manifest import ManifestLog

    store.save(0, state(0, rank))
    storage = store.storage
    real_delete, real_create, real_read = storage.delete, storage.create_exclusive, ManifestLog.read
    if rank == 0:

        def denied(rel: str) -> None:
            raise StorageError(f"AccessDenied: DeleteObject on {rel} (injected)")

        storage.delete = denied  # type: ignore[method-assign]
    try:
        info = store.save(0, state(0, rank), overwrite=True)
        emit(rank, "saved", itr=0, objects=sorted(info.objects()))
    except Exception as exc:
        error_event(rank, 0, exc)
    storage.delete = real_delete  # type: ignore[method-assign]
    if rank == 0:
        reads = 0

        def lost_response(rel: str, data: bytes) -> None:
            real_create(rel, data)
            raise StorageError(f"connection reset while creating {rel} (injected: the create landed)")

        def failing_read(self: ManifestLog) -> Any:
            nonlocal reads
            reads += 1
            if reads > 2:  # the plan's and the commit's reads work; the one after the lost response fails
                raise StorageError("timed out reading the manifest (injected)")
            return real_read(self)

        storage.create_exclusive = lost_response  # type: ignore[method-assign]
        ManifestLog.read = failing_read  # type: ignore[method-assign]
    try:
        store.save(1, state(1, rank))
        emit(rank, "saved", itr=1)
    except Exception as exc:
        error_event(rank, 1, exc)
    storage.create_exclusive = real_create  # type: ignore[method-assign]
    ManifestLog.read = real_read  # type: ignore[method-assign]


def main() -> None:
    scenario, rank, world, init_file, url, options = sys.argv[1], *map(int, sys.argv[2:4]), *sys.argv[4:7]
    print("ready", flush=True)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=GROUP_TIMEOUT)
    )
    store = SnapshotStore(url, storage_options=json.loads(options), max_in_flight=2)
    try:
        scenarios = {
            "roundtrip": roundtrip,
            "save": save,
            "restore": restore,
            "errors": errors,
            "kill": kill,
            "preempt": preempt,
            "preempt_after_agree": preempt_self("after_agree"),
            "preempt_between_steps": preempt_self("between_steps"),
            "landed": landed,
        }
        scenarios[scenario](store, rank, world)
    except BaseException as exc:
        emit(rank, "crashed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        sys.stdout.flush()
        os._exit(1)
    if scenario == "kill":  # the group lost a rank: tearing it down could wait on the dead peer
        sys.stdout.flush()
        os._exit(0)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
