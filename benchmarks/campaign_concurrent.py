"""Concurrent-writers campaign: W processes commit P snapshots each to one run, all released at once.

Writer ``w`` saves itrs ``w, w + W, w + 2W, ...``, so the final manifest must hold exactly ``W * P`` itrs; each
reports how many commits it retried because another writer committed first (``SnapshotStore.conflicts``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from benchmarks.campaign_common import Target, check_state, context, state_for


@dataclass
class ConcurrentFigures:
    backend: str
    writers: int = 0
    attempted: int = 0
    in_manifest: int = 0
    conflicts_retried: int = 0
    writer_errors: int = 0
    corrupt: int = 0
    seconds: float = 0.0


def writer(
    url: str, options: dict[str, Any], w: int, writers: int, per_writer: int, barrier: Any, conn: Connection
) -> None:
    from bucketsnap import SnapshotStore

    store = SnapshotStore(url, storage_options=options)
    barrier.wait()
    errors = 0
    for j in range(per_writer):
        itr = w + j * writers
        try:
            store.save(itr, state_for(itr, 256), metrics={"writer": w})
        except Exception as exc:
            errors += 1
            print(f"  writer {w}: itr {itr}: {exc!r}", flush=True)
    conn.send((store.conflicts, errors))


def run(target: Target, *, writers: int = 8, per_writer: int = 50) -> ConcurrentFigures:
    from bucketsnap import BucketsnapError, SnapshotStore

    figures = ConcurrentFigures(target.name, writers=writers, attempted=writers * per_writer)
    url = target.url("concurrent")
    ctx = context()
    barrier = ctx.Barrier(writers)  # type: ignore[attr-defined]
    pipes, procs = [], []
    for w in range(writers):
        receive, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(  # type: ignore[attr-defined]
            target=writer, args=(url, target.options, w, writers, per_writer, barrier, send), daemon=True
        )
        proc.start()
        send.close()
        pipes.append(receive)
        procs.append(proc)
    start = time.monotonic()
    for receive, proc in zip(pipes, procs, strict=True):
        try:
            conflicts, errors = receive.recv()
        except EOFError:  # the writer died
            conflicts, errors = 0, per_writer
        figures.conflicts_retried += conflicts
        figures.writer_errors += errors
        proc.join()
    figures.seconds = time.monotonic() - start
    store = SnapshotStore(url, storage_options=target.options)
    itrs = store.itrs()
    figures.in_manifest = len(itrs)
    for itr in itrs:
        try:
            figures.corrupt += check_state(itr, store.load(itr)) is not None
        except BucketsnapError:
            figures.corrupt += 1
    return figures
