"""Where a restore's client CPU goes, thread by thread, against the store's ceiling for the same bytes.

A restore from S3 or GCS runs on three kinds of threads: the filesystem's event loop (``fsspecIO``: the HTTP
requests and responses, for bucketsnap and for the ceiling alike), the read pool (``bucketsnap-read``: each
unit's ranged read waits there, its frames' CRC-32 and decoding, and the faulting-in of the destination's
pages) and the caller's thread (``MainThread``: opening the store, the manifest, the copy of each unit into
the tensor). This script restores the policy of ``bench_save.py``'s state (135 MB; ``--whole``: all 404 MB)
by a new store ``--runs`` times, each followed by the ceiling's ranged GETs of the same bytes
(``benchmarks/_ceiling.py``), and prints the CPU seconds per GB of each kind of thread, user and system apart,
read from ``/proc/self/task`` (Linux), summed over the runs. CPU seconds, unlike wall time, are not stretched
by other load on the machine. Run::

    python benchmarks/bench_restore_cpu.py [--gcs] [--whole] [--runs 6]
"""

from __future__ import annotations

import argparse
import collections
import gc
import os
import re
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _ceiling import Ceiling, load_average
from bench_save import make_state, nbytes

from bucketsnap import SnapshotStore

_TICK = os.sysconf("SC_CLK_TCK")


def thread_times() -> dict[int, tuple[str, float, float]]:
    """Native thread id -> (its Python name without a trailing number, user s, system s)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out = {}
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
        name = re.sub(r"_?\d+$", "", names.get(int(task), "other"))
        out[int(task)] = (name, int(fields[11]) / _TICK, int(fields[12]) / _TICK)
    return out


def cpu_by_thread(fn: Callable[[], object], into: dict[str, list[float]]) -> None:
    """Run ``fn``, adding each kind of thread's user and system CPU seconds to ``into``."""
    gc.collect()
    before = thread_times()
    fn()
    for task, (name, user, system) in thread_times().items():
        _, user0, system0 = before.get(task, (name, 0.0, 0.0))
        into[name][0] += user - user0
        into[name][1] += system - system0


def start_server(gcs: bool) -> tuple[Any, str, dict[str, Any]]:
    """The S3 test server (or, with ``gcs``, fake-gcs-server) started, a new bucket's URL and the storage
    options that reach it."""
    import servers

    if gcs:
        server: Any = servers.gcs_server()
        return server, f"gs://{server.create_bucket()}", servers.gcs_storage_options(server)
    server = servers.s3_server()
    return server, f"s3://{server.create_bucket()}", servers.s3_storage_options(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gcs", action="store_true", help="fake-gcs-server instead of S3")
    parser.add_argument("--whole", action="store_true", help="restore the whole 404 MB, not the policy alone")
    parser.add_argument("--runs", type=int, default=6)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    server, bucket, options = start_server(args.gcs)
    url = f"{bucket}/run"
    keys = None if args.whole else ["policy"]
    try:
        state = make_state(False)
        SnapshotStore(url, storage_options=options).save(1, state)
        ceiling = Ceiling(f"{url}-ceiling", options)
        _, path = ceiling.put(nbytes(state) + 2**20)
        read = [0]

        def restore() -> None:
            store = SnapshotStore(url, storage_options=options)
            store.load("last", keys=keys)
            read[0] = store.storage.bytes_read

        restore()  # the first contact and the connections, out of the figures
        cpu: dict[str, dict[str, list[float]]] = {
            side: collections.defaultdict(lambda: [0.0, 0.0]) for side in ("bucketsnap", "ceiling")
        }
        loads = []
        for _ in range(args.runs):
            loads.append(os.getloadavg()[0])
            cpu_by_thread(restore, cpu["bucketsnap"])
            cpu_by_thread(lambda: ceiling.get(path, read[0]), cpu["ceiling"])
        gb = read[0] * args.runs / 1e9
        store = "GCS (fake-gcs-server)" if args.gcs else "S3"
        what = "whole" if args.whole else "policy only"
        print(
            f"{store}, restore {what}, {read[0] / 1e6:.0f} MB, {args.runs} runs, load {min(loads):.1f}-"
            f"{max(loads):.1f} (now {load_average()}): CPU s/GB, user + system"
        )
        names = sorted({n for side in cpu.values() for n, (u, s) in side.items() if u + s > 0})
        print("| side | " + " | ".join(names) + " | total |")
        print("|---|" + "---:|" * (len(names) + 1))
        for side, by_name in cpu.items():
            cells = [f"{by_name[n][0] / gb:.2f} + {by_name[n][1] / gb:.2f}" for n in names]
            user, system = (sum(v[i] for v in by_name.values()) / gb for i in (0, 1))
            print(f"| {side} | " + " | ".join(cells) + f" | {user:.2f} + {system:.2f} |")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
