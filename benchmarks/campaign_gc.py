"""gc-during-saves campaign: W writer processes save snapshots that share replay-buffer chunks, under retention,
while another process runs ``gc(min_age=0)`` in a loop and the campaign freezes random writers (SIGSTOP) for up
to ``max_pause`` seconds at random moments.

``gc(min_age=0)`` beside running saves is the hardest case for the fencing of docs/protocol.md: every object of a
save in flight is condemned and deleted as soon as gc sees it. A save may then fail (``StorageError``, counted in
``saves_failed_by_gc``); what must never happen is a committed snapshot that lacks an object or differs from
what was saved. Each writer checks its own snapshot right after a save returns: while it is still committed,
every object must be there and every byte must match. At the end every committed snapshot is verified and loaded.
"""

from __future__ import annotations

import os
import random
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
from benchmarks.campaign_common import Target, check_state, context, state_for

ROWS = 64


@dataclass
class GcFigures:
    backend: str
    writers: int = 0
    saves_attempted: int = 0
    saves_committed: int = 0
    saves_failed_by_gc: int = 0
    other_errors: int = 0
    pauses: int = 0
    gc_runs: int = 0
    objects_deleted: int = 0
    checked_after_save: int = 0
    dropped_before_check: int = 0
    missing_while_committed: int = 0
    corrupt: int = 0
    final_committed: int = 0
    final_corrupt: int = 0
    leftovers_after_gc: int = 0
    seconds: float = 0.0


def _state(itr: int) -> dict[str, Any]:
    from bucketsnap._chunks import ChunkedArrays

    # Rows depend on itr // 4 and on the chunk: saves share most chunks with their neighbours (and with orphans).
    rows = np.stack([np.full(16, (itr // 4 + r // 16) % 7, dtype=np.uint8) for r in range(ROWS)])
    return {**state_for(itr, 2048), "buffer": ChunkedArrays({"obs": rows}, ROWS, kind="campaign", chunk_rows=16)}


def _check_buffer(itr: int, table: Any, storage: Any, where: str) -> str | None:
    from bucketsnap._chunks import ChunkTable, read_chunks

    parsed = ChunkTable.parse(table, where)
    got = np.concatenate([rows["obs"] for _, rows in read_chunks(storage, parsed, where=where, verify=True)])
    expected = _state(itr)["buffer"].arrays["obs"]
    return None if np.array_equal(got, expected) else f"buffer of itr {itr} differs"


def writer(url: str, options: dict[str, Any], w: int, writers: int, per_writer: int, conn: Connection) -> None:
    from bucketsnap import BucketsnapError, CorruptSnapshotError, KeepLast, SnapshotStore, StorageError

    store = SnapshotStore(url, storage_options=options, retention=KeepLast(4))
    counts = dict.fromkeys(("committed", "refused", "errors", "checked", "dropped", "missing", "corrupt"), 0)
    for j in range(per_writer):
        itr = w + j * writers
        try:
            store.save(itr, _state(itr))
        except StorageError as exc:
            # The fence, or (local disk) a temp file gc deleted under a commit in progress: nothing committed.
            if "gc deleted or may have deleted" in str(exc) or "vanished before it was moved" in str(exc):
                counts["refused"] += 1
            else:
                counts["errors"] += 1
                print(f"  writer {w}: itr {itr}: {exc}", flush=True)
            continue
        except BucketsnapError as exc:
            counts["errors"] += 1
            print(f"  writer {w}: itr {itr}: {exc}", flush=True)
            continue
        counts["committed"] += 1
        try:
            store.verify(itr)
            problem = check_state(itr, store.load(itr, keys=["policy", "optimizer", "itr"]))
            problem = problem or _check_buffer(itr, store.open(itr)["buffer"], store.storage, store.url)
            counts["checked"] += 1
            if problem:
                counts["corrupt"] += 1
                print(f"  writer {w}: itr {itr}: {problem}", flush=True)
        except CorruptSnapshotError as exc:
            counts["corrupt"] += 1
            print(f"  writer {w}: itr {itr}: {exc}", flush=True)
        except (FileNotFoundError, KeyError, BucketsnapError) as exc:
            if itr in store.itrs():  # still committed, yet something it needs is gone
                counts["missing"] += 1
                print(f"  writer {w}: itr {itr} committed but: {exc}", flush=True)
            else:
                counts["dropped"] += 1  # retention dropped it and gc deleted it: allowed
    conn.send(counts)


def collector(url: str, options: dict[str, Any], stop: Any, conn: Connection) -> None:
    from bucketsnap import BucketsnapError, SnapshotStore

    store = SnapshotStore(url, storage_options=options)
    runs = deleted = 0
    while not stop.is_set():
        try:
            deleted += len(store.gc(min_age=0))
            runs += 1
        except BucketsnapError as exc:
            print(f"  gc: {exc}", flush=True)
        time.sleep(0.05)
    conn.send((runs, deleted))


def run(target: Target, *, writers: int = 4, per_writer: int = 40, max_pause: float = 2.0, seed: int = 0) -> GcFigures:
    from bucketsnap import BucketsnapError, SnapshotStore
    from bucketsnap._maintenance import DATA_DIRS

    rng = random.Random(seed)
    figures = GcFigures(target.name, writers=writers, saves_attempted=writers * per_writer)
    url = target.url("gc")
    ctx = context()
    stop = ctx.Event()  # type: ignore[attr-defined]
    gc_receive, gc_send = ctx.Pipe(duplex=False)
    gc_proc = ctx.Process(target=collector, args=(url, target.options, stop, gc_send), daemon=True)  # type: ignore[attr-defined]
    pipes, procs = [], []
    start = time.monotonic()
    for w in range(writers):
        receive, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=writer, args=(url, target.options, w, writers, per_writer, send), daemon=True)  # type: ignore[attr-defined]
        proc.start()
        send.close()
        pipes.append(receive)
        procs.append(proc)
    gc_proc.start()
    gc_send.close()
    while any(p.is_alive() for p in procs):  # freeze a random writer now and then, as a hibernated VM
        time.sleep(rng.uniform(0.1, 0.5))
        alive = [p for p in procs if p.is_alive() and p.pid is not None]
        if not alive:
            break
        victim = rng.choice(alive)
        try:
            os.kill(victim.pid, signal.SIGSTOP)  # type: ignore[arg-type]
            time.sleep(rng.uniform(0.0, max_pause))
            os.kill(victim.pid, signal.SIGCONT)  # type: ignore[arg-type]
            figures.pauses += 1
        except ProcessLookupError:
            pass
    for receive, proc in zip(pipes, procs, strict=True):
        try:
            counts = receive.recv()
        except EOFError:
            counts = {"errors": per_writer}
        figures.saves_committed += counts.get("committed", 0)
        figures.saves_failed_by_gc += counts.get("refused", 0)
        figures.other_errors += counts.get("errors", 0)
        figures.checked_after_save += counts.get("checked", 0)
        figures.dropped_before_check += counts.get("dropped", 0)
        figures.missing_while_committed += counts.get("missing", 0)
        figures.corrupt += counts.get("corrupt", 0)
        proc.join()
    stop.set()
    figures.gc_runs, figures.objects_deleted = gc_receive.recv()
    gc_proc.join()
    figures.seconds = time.monotonic() - start
    store = SnapshotStore(url, storage_options=target.options)
    for itr in store.itrs():
        figures.final_committed += 1
        try:
            store.verify(itr)
            problem = check_state(itr, store.load(itr, keys=["policy", "optimizer", "itr"]))
            problem = problem or _check_buffer(itr, store.open(itr)["buffer"], store.storage, store.url)
        except BucketsnapError as exc:
            problem = str(exc)
        if problem:
            figures.final_corrupt += 1
            print(f"  final: itr {itr}: {problem}", flush=True)
    store.gc(min_age=0)
    stored = {f"{d}/{n}" for d in DATA_DIRS for n in store.storage.list(d)}
    needed = set().union(*(info.objects() for info in store.infos()))
    figures.leftovers_after_gc = len(stored - needed)
    return figures
