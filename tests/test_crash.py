"""Crash safety: a saving process SIGKILLed at random instants never harms a committed snapshot."""

from __future__ import annotations

import random
import sys
import time
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path

import torch

from bucketsnap import SnapshotStore
from bucketsnap._storage import PROBE_PREFIX
from conftest import Backend

sys.path.insert(0, str(Path(__file__).parent / "workers"))
import saver

from helpers import FORKSERVER  # a saver is ready in milliseconds, not in a new interpreter's seconds


def start_saver(
    backend: Backend, url: str, first: int, step: int, count: int, size: int
) -> tuple[BaseProcess, Connection]:
    """A saver process, started and ready (its store open), and the end of the pipe it reports on."""
    receive, send = FORKSERVER.Pipe(duplex=False)
    proc = FORKSERVER.Process(target=saver.save, args=(url, backend.options, first, step, count, size, send))
    proc.start()
    send.close()
    assert receive.poll(120) and receive.recv() == "ready"
    return proc, receive


def lines_of(proc: BaseProcess, receive: Connection) -> list[str]:
    """What the saver reported, once it has ended (killed or finished)."""
    proc.join()
    lines = []
    while receive.poll():
        try:
            lines.append(receive.recv())
        except EOFError:
            break
    receive.close()
    return lines


def check_run(store: SnapshotStore, committed: set[int], *, only: set[int] | None = None) -> None:
    """Every committed itr is listed, ``last`` is the newest, and each itr (of ``only``) loads and verifies."""
    itrs = store.itrs()
    assert committed <= set(itrs), f"lost commits: {sorted(committed - set(itrs))}"
    for itr in sorted(set(itrs) if only is None else only & set(itrs)):
        store.verify(itr)
        snap = store.load(itr)
        generator = torch.Generator().manual_seed(itr)
        assert snap["itr"] == itr
        assert torch.equal(snap["policy"], torch.randn(snap["policy"].numel(), generator=generator))
    if itrs:
        assert store.info("last").itr == max(itrs)


def test_sigkill_at_random_instants_leaves_committed_snapshots_intact(process_backend: Backend) -> None:
    rng = random.Random(1234)
    url = process_backend.url("crash")
    store = SnapshotStore(url, storage_options=process_backend.options)
    committed: set[int] = set()
    kills = 10 if process_backend.name == "local" else 6
    next_itr = 0
    for _ in range(kills):
        # Sizes up to 7 x 400k floats (11 MB): many saves span several 5 MiB upload parts.
        proc, receive = start_saver(process_backend, url, next_itr, 1, 1000, 400_000)
        time.sleep(rng.uniform(0.05, 1.2))
        proc.kill()  # SIGKILL
        committed |= {int(line.split()[1]) for line in lines_of(proc, receive) if line.startswith("committed")}
        # The new snapshots and the one around the kill are read whole; all of them again at the end.
        check_run(store, committed, only=set(range(next_itr, max(store.itrs(), default=0) + 1)))
        next_itr = max(store.itrs(), default=-1) + 1
    assert committed, "the saver never committed: the kills came too early to test anything"
    store.gc(min_age=0)
    referenced = {info.path.rsplit("/", 1)[-1] for info in store.infos()}
    # A saver killed during its exclusive-create probe (S3, GCS) leaves the probe object, which gc keeps for an
    # hour by design: deleting a probe in progress would make another process misjudge the store.
    stored = {name for name in store.storage.list("snapshots") if not name.startswith(PROBE_PREFIX)}
    assert stored == referenced, "gc removed every orphan and nothing committed"
    check_run(store, committed)


def test_two_processes_committing_concurrently_lose_nothing(process_backend: Backend) -> None:
    url = process_backend.url("concurrent")
    per_writer = 15
    writers = [start_saver(process_backend, url, first, 2, per_writer, 1000) for first in (0, 1)]
    outputs = [lines_of(proc, receive) for proc, receive in writers]
    assert all(proc.exitcode == 0 for proc, _ in writers), outputs
    store = SnapshotStore(url, storage_options=process_backend.options)
    assert store.itrs() == list(range(2 * per_writer))
    check_run(store, set(range(2 * per_writer)))
    lines = [line.split() for out in outputs for line in out]
    conflicts = sum(int(words[1]) for words in lines if words[0] == "conflicts")
    print(f"{process_backend.name}: {2 * per_writer} commits, {conflicts} conflicts retried")
