"""Readers-during-writes campaign: reader processes load ``last`` in a loop while a writer saves and prunes.

The writer keeps the newest few snapshots (``retention=KeepLast(n)`` where the store has it, else
``store.delete``) and runs ``gc(min_age=0)`` every few saves, so archives that readers may be reading vanish.
A reader may get :class:`~bucketsnap.SnapshotNotFoundError` (documented as retry-able: the snapshot it
resolved was pruned meanwhile); any other error, and any load that is not exactly one snapshot's state, counts.
"""

from __future__ import annotations

import inspect
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from benchmarks.campaign_common import Target, check_state, context, state_for


@dataclass
class ReaderFigures:
    backend: str
    readers: int = 0
    saves: int = 0
    pruned_by: str = ""
    loads: int = 0
    retryable_errors: int = 0
    other_errors: int = 0
    mixed_or_partial: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0


def reader(url: str, options: dict[str, Any], ready: Any, stop: Any, conn: Connection) -> None:
    from bucketsnap import SnapshotNotFoundError, SnapshotStore

    store = SnapshotStore(url, storage_options=options)
    loads = retryable = mixed = 0
    errors: Counter[str] = Counter()
    store.load("last")
    ready.wait()  # every reader is reading before the writer starts
    while not stop.is_set():
        try:
            snap = store.open("last")
            loaded = snap.load()
        except SnapshotNotFoundError as exc:
            retryable += 1
            errors[f"SnapshotNotFoundError: {str(exc)[:60]}"] += 1
            continue
        except Exception as exc:
            errors[f"{type(exc).__name__}: {str(exc)[:200]}"] += 1
            continue
        loads += 1
        mixed += check_state(snap.info.itr, loaded) is not None
    conn.send((loads, retryable, mixed, errors))


def run(
    target: Target, *, readers: int = 3, saves: int = 40, keep: int = 2, gc_every: int = 3, floats: int = 200_000
) -> ReaderFigures:
    from bucketsnap import SnapshotStore

    figures = ReaderFigures(target.name, readers=readers)
    url = target.url("readers")
    store: Any
    if "retention" in inspect.signature(SnapshotStore).parameters:
        from bucketsnap.retention import KeepLast  # type: ignore[import-not-found,unused-ignore]

        store = SnapshotStore(url, storage_options=target.options, retention=KeepLast(keep))
        figures.pruned_by = f"retention=KeepLast({keep})"
    else:
        store = SnapshotStore(url, storage_options=target.options)
        figures.pruned_by = f"store.delete (keep {keep})"
    store.save(0, state_for(0, floats))
    ctx = context()
    stop = ctx.Event()  # type: ignore[attr-defined]
    ready = ctx.Barrier(readers + 1, timeout=120)  # type: ignore[attr-defined]
    pipes, procs = [], []
    for _ in range(readers):
        receive, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=reader, args=(url, target.options, ready, stop, send), daemon=True)  # type: ignore[attr-defined]
        proc.start()
        send.close()
        pipes.append(receive)
        procs.append(proc)
    ready.wait()
    start = time.monotonic()
    for itr in range(1, saves + 1):
        store.save(itr, state_for(itr, floats))
        if figures.pruned_by.startswith("store.delete"):
            for old in store.itrs()[:-keep]:
                store.delete(old)
        if itr % gc_every == 0:
            store.gc(min_age=0)
        figures.saves += 1
    stop.set()
    for receive, proc in zip(pipes, procs, strict=True):
        loads, retryable, mixed, errors = receive.recv()
        figures.loads += loads
        figures.retryable_errors += retryable
        figures.mixed_or_partial += mixed
        figures.other_errors += sum(n for e, n in errors.items() if not e.startswith("SnapshotNotFoundError"))
        figures.errors.update(errors)
        proc.join()
    figures.seconds = time.monotonic() - start
    return figures
