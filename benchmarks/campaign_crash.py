"""Crash campaign: saver processes SIGKILLed at random instants; after each kill the run must be whole.

A saver process saves itrs ``first, first + 1, ...`` forever, mixing ``save`` and ``save_async`` and small
states with large ones that span several upload parts, and reports each itr once its save returned (or its
future resolved). The parent kills it with SIGKILL at a random instant, then checks that every reported itr is
committed, that every committed snapshot loads and verifies and is exactly the state saved for its itr, that
``last`` is the newest committed itr, and that ``gc`` leaves exactly the committed archives behind.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from benchmarks.campaign_common import PART_SIZE, Target, check_state, context, state_for

from bucketsnap._storage import PROBE_PREFIX


@dataclass
class CrashFigures:
    backend: str
    kills: int = 0
    commits: int = 0
    snapshots_checked: int = 0
    corrupt: int = 0
    lost: int = 0
    last_wrong: int = 0
    orphans_removed: int = 0
    leftovers_after_gc: int = 0
    seconds: float = 0.0


def saver(url: str, options: dict[str, Any], first: int, seed: int, small: int, big: int, conn: Connection) -> None:
    """Worker: save forever; send each itr once it is committed."""
    from bucketsnap import SnapshotStore

    rng = random.Random(seed)
    store = SnapshotStore(url, storage_options=options, part_size=PART_SIZE, max_in_flight=2)
    store.itrs()  # connected: from here on, the kill may land anywhere in a save
    conn.send("ready")
    itr = first
    while True:
        state = state_for(itr, big if rng.random() < 0.25 else small)
        if rng.random() < 0.5:
            store.save(itr, state)
            conn.send(itr)
        else:
            future = store.save_async(itr, state)
            future.add_done_callback(lambda f, itr=itr: f.exception() is None and conn.send(itr))
        itr += 1


_GENERATION_NAME = re.compile(r"^\d{12}\.json$")


def check_run(url: str, target: Target, committed: set[int], figures: CrashFigures) -> int:
    """Check the run after a kill; return the next itr to save."""
    from bucketsnap import BucketsnapError, SnapshotStore

    store = SnapshotStore(url, storage_options=target.options)
    itrs = store.itrs()
    for _ in range(20):  # a request the killed saver had sent may still land (seen on fake-gcs-server): settle
        time.sleep(0.25)
        if (again := store.itrs()) == itrs:
            break
        itrs = again
    figures.lost += len(committed - set(itrs))
    for itr in itrs:
        figures.snapshots_checked += 1
        try:
            store.verify(itr)
            problem = check_state(itr, store.load(itr))
        except BucketsnapError as exc:
            problem = repr(exc)
        if problem is not None:
            figures.corrupt += 1
            print(f"  {target.name}: itr {itr}: {problem}")
    if itrs and (store.info("last").itr != max(itrs) or max(committed, default=-1) > max(itrs)):
        figures.last_wrong += 1
    figures.orphans_removed += len(store.gc(min_age=0))
    referenced = {info.path.rsplit("/", 1)[-1] for info in store.infos()}
    leftovers = set(store.storage.list("snapshots")) ^ referenced
    leftovers |= {n for n in store.storage.list("manifest") if not _GENERATION_NAME.match(n) and n != "pages"}
    leftovers |= {f"pages/{n}" for n in store.storage.list("manifest/pages") if not n.endswith(".json")}  # temp files
    # A saver killed during its exclusive-create probe leaves the probe object; gc keeps it for an hour (deleting
    # a probe in progress would make another process misjudge the store), then removes it.
    leftovers = {n for n in leftovers if not n.rsplit("/", 1)[-1].startswith(PROBE_PREFIX)}
    if leftovers:
        print(f"  {target.name}: left after gc: {sorted(leftovers)}")
    figures.leftovers_after_gc += len(leftovers)
    return max(itrs, default=-1) + 1


def run(
    target: Target,
    *,
    kills: int,
    seed: int = 0,
    per_run: int = 25,
    small: int = 20_000,
    big: int = 2_000_000,
    max_delay: float = 1.5,
) -> CrashFigures:
    """SIGKILL ``kills`` savers; a fresh run every ``per_run`` kills bounds the re-verification work."""
    rng = random.Random(seed)
    figures = CrashFigures(target.name)
    start = time.monotonic()
    ctx = context()
    url, committed, next_itr = "", set[int](), 0
    for kill in range(kills):
        if kill % per_run == 0:
            url, committed, next_itr = target.url("crash"), set(), 0
        receive, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(  # type: ignore[attr-defined]
            target=saver, args=(url, target.options, next_itr, rng.randrange(2**31), small, big, send), daemon=True
        )
        proc.start()
        send.close()
        if receive.poll(60):
            receive.recv()  # "ready"
        time.sleep(rng.uniform(0.0, max_delay))
        proc.kill()
        proc.join()
        while receive.poll():
            try:
                committed.add(receive.recv())
                figures.commits += 1
            except EOFError:
                break
        receive.close()
        figures.kills += 1
        next_itr = check_run(url, target, committed, figures)
    figures.seconds = time.monotonic() - start
    return figures
