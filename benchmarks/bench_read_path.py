"""Where a restore's time goes against the store's ceiling: the transport bucketsnap's reader uses, then the reader.

``bench_save.py --ceiling-only`` reports a restore as a fraction of the store's ceiling (``_ceiling.py``: ranged
GETs of 4 MiB, 8 in flight, awaited together on the filesystem's event loop, their bytes dropped). This script
splits the gap in two, restoring ``bench_save.py``'s policy (135 MB; ``--whole``: the 404 MB state) by a new
store each run, in alternating order with:

* **ceiling**: the ceiling's ranged GETs of the same bytes;
* **reads from threads**: the same ranged GETs made as bucketsnap's reader makes them, each by
  ``Storage.read_into`` from one of 8 threads (one request at a time per thread, each hopping onto the event
  loop) into one of its reused 4 MiB buffers, the bytes then dropped: no CRC-32, no frame parsing, no copy into
  a tensor, no new memory;
* **bucketsnap load**: ``SnapshotStore(url).load("last", keys=["policy"])``.

The first share is the transport's cost (threads instead of one gathered call); the gap between the second and
the third is the reader's (checks, the copy into the tensors, their new pages). Each step's CPU time is also
measured, this process's (all threads) and the test server's (its processes): the server runs on the same cores,
so a step that costs more CPU leaves it less. The last line says what a restore would take if it kept the cores
as busy as the ceiling does, given its CPU: where that is about what it takes, the restore is bound by the
machine's CPU, not by waiting. Run::

    python benchmarks/bench_read_path.py [--gcs] [--whole] [--runs 9]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil
from _ceiling import Ceiling, load_average
from bench_restore_cpu import start_server
from bench_save import make_state, nbytes

from bucketsnap import SnapshotStore
from bucketsnap._zipformat import READ_AHEAD, READ_CHUNK


def reads_from_threads(store: SnapshotStore, rel: str, start: int, size: int) -> float:
    """Seconds to read ``[start, start + size)`` of ``rel`` as the reader's pool does, the bytes dropped."""
    buffers = [bytearray(READ_CHUNK) for _ in range(READ_AHEAD)]
    offsets = range(start, start + size, READ_CHUNK)

    def read(i: int) -> int:
        n = min(READ_CHUNK, start + size - offsets[i])
        return store.storage.read_into(rel, offsets[i], memoryview(buffers[i % READ_AHEAD])[:n])

    began = time.perf_counter()
    with ThreadPoolExecutor(READ_AHEAD, thread_name_prefix="bench-read") as pool:
        got = sum(pool.map(read, range(len(offsets))))
    seconds = time.perf_counter() - began
    if got != size:
        raise SystemExit(f"read {got} bytes of {size}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gcs", action="store_true", help="GCS (fake-gcs-server) instead of S3 (LocalStack)")
    parser.add_argument("--whole", action="store_true", help="the whole 404 MB state, not the policy alone")
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    server, url, options = start_server(args.gcs)
    try:
        state = make_state(small=False)
        store = SnapshotStore(f"{url}/run", storage_options=options)
        info = store.save(1, state)
        keys = None if args.whole else ["policy"]
        members = [m for key, m in info.members.items() if keys is None or key in keys]
        start = min(m.offset for m in members)
        size = max(m.offset + m.stored_size for m in members) - start
        ceiling = Ceiling(f"{url}/ceiling", options)
        _, raw = ceiling.put(size)
        times: dict[str, list[float]] = {"ceiling": [], "reads from threads": [], "bucketsnap load": []}
        cpu: dict[str, list[tuple[float, float]]] = {name: [] for name in times}
        serving = psutil.Process().children(recursive=True)  # the test server's processes
        loads = [load_average()]

        def bucketsnap_load() -> float:
            reader = SnapshotStore(f"{url}/run", storage_options=options)
            began = time.perf_counter()
            reader.load("last", keys=keys)
            return time.perf_counter() - began

        steps = {
            "ceiling": lambda: ceiling.get(raw, size),
            "reads from threads": lambda: reads_from_threads(store, info.path, start, size),
            "bucketsnap load": bucketsnap_load,
        }
        for run in range(args.runs):
            order = list(steps) if run % 2 == 0 else list(reversed(steps))
            for name in order:
                gc.collect()
                before = cpu_seconds(serving)
                times[name].append(steps[name]())
                cpu[name].append(tuple(b - a for a, b in zip(before, cpu_seconds(serving), strict=True)))  # type: ignore[arg-type]
        loads.append(load_average())
    finally:
        server.stop()
    what = "whole state" if args.whole else "policy"
    print(
        f"{'GCS' if args.gcs else 'S3'} ({getattr(server, 'kind', type(server).__name__)}), {what}: "
        f"{size / 2**20:.0f} of {nbytes(state) / 2**20:.0f} MiB, "
        f"{args.runs} runs, load {loads[0]} -> {loads[-1]}; median seconds, and the median of the runs' shares of "
        "the ceiling"
    )
    print("| | s | of the ceiling | CPU: this process, the server (s) | cores busy |")
    print("|---|---:|---:|---:|---:|")
    for name, seconds in times.items():
        share = statistics.median(c / s for c, s in zip(times["ceiling"], seconds, strict=True))
        mine, server = (statistics.median(x[i] for x in cpu[name]) for i in (0, 1))
        busy = statistics.median((x[0] + x[1]) / s for x, s in zip(cpu[name], seconds, strict=True))
        print(f"| {name} | {statistics.median(seconds):.3f} | {share:.0%} | {mine:.3f}, {server:.3f} | {busy:.2f} |")
    ceiling_busy = statistics.median((x[0] + x[1]) / s for x, s in zip(cpu["ceiling"], times["ceiling"], strict=True))
    load_cpu = statistics.median(x[0] + x[1] for x in cpu["bucketsnap load"])
    bound = load_cpu / ceiling_busy
    print(
        f"\nbucketsnap's load costs {load_cpu:.3f} s of CPU with the server's; keeping the cores as busy as the "
        f"ceiling does ({ceiling_busy:.2f} of {os.cpu_count()}), it would take {bound:.3f} s, "
        f"{statistics.median(times['ceiling']) / bound:.0%} of the ceiling"
    )


def cpu_seconds(serving: list[psutil.Process]) -> tuple[float, float]:
    """User + system CPU seconds of this process (all its threads) and of the server's processes."""
    mine = psutil.Process().cpu_times()
    server = 0.0
    for process in serving:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        server += times.user + times.system
    return mine.user + mine.system, server


if __name__ == "__main__":
    main()
