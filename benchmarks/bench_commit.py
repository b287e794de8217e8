"""The commit log at scale: what a save's commit writes and costs, and what ``last``/``first``/``itr`` and listing
every itr read, with 10 and with 10,000 committed snapshots, on local disk and on the S3 test server.

A run of N snapshots is made by one real save and one commit of N-1 more entries sharing its archive (the commit
pages them as it would upgrade a version-2 run), then ``--saves`` real saves of a tiny state are timed (median),
with the bytes they write under ``manifest/`` (generation and pages, averaged over whole seal cycles), the
requests they make, and the DELETEs their pruning sends. Reads are from a fresh store (nothing cached): the
requests (listings + reads) and bytes of ``info("last")``, ``info("first")``, ``info(itr)`` of an old itr and of
an absent one, and ``itrs()``. Run::

    python benchmarks/bench_commit.py [--sizes 10,10000] [--saves 32] [--skip-s3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bucketsnap import SnapshotStore
from bucketsnap._storage import Storage


class Tally:
    """Counts a Storage's requests, the bytes it reads, the bytes it writes under manifest/, and its DELETEs."""

    def __init__(self, storage: Storage) -> None:
        self.requests = self.read_bytes = self.written = self.deletes = 0
        real_list, real_read = storage.list, storage.read
        real_create, real_delete = storage.create_exclusive, storage.delete

        def listing(rel_dir: str) -> list[str]:
            self.requests += 1
            return real_list(rel_dir)

        def read(rel: str, start: int | None = None, end: int | None = None) -> bytes:
            data = real_read(rel, start, end)
            self.requests += 1
            self.read_bytes += len(data)
            return data

        def create(rel: str, data: bytes) -> None:
            self.requests += 1
            if rel.startswith("manifest/"):
                self.written += len(data)
            real_create(rel, data)

        def delete(rel: str) -> None:
            self.requests += 1
            self.deletes += 1
            real_delete(rel)

        storage.list, storage.read = listing, read  # type: ignore[method-assign]
        storage.create_exclusive, storage.delete = create, delete  # type: ignore[method-assign]


def build(url: str, options: dict[str, Any], count: int) -> None:
    store = SnapshotStore(url, storage_options=options)
    real = store.save(0, {"step": 0}, metrics={"return": 0.0})
    if count > 1:
        store._log.commit(lambda current: [real] + [replace(real, itr=i) for i in range(1, count)])


def measure(url: str, options: dict[str, Any], count: int, saves: int) -> dict[str, Any]:
    build(url, options, count)
    writer = SnapshotStore(url, storage_options=options)
    writer.itrs()  # a writer that has read the run once, as a training process has
    tally = Tally(writer.storage)
    times = []
    for i in range(saves):
        start = time.perf_counter()
        writer.save(count + i, {"step": count + i}, metrics={"return": float(i)})
        times.append(time.perf_counter() - start)
    row: dict[str, Any] = {
        "save_ms": statistics.median(times) * 1e3,
        "manifest_bytes": tally.written / saves,
        "save_requests": tally.requests / saves,
        "prune_deletes": tally.deletes / saves,
    }
    old = (count // 2) if count > 2 else 0
    for name, which in [("last", "last"), ("first", "first"), ("itr", old)]:
        reader = SnapshotStore(url, storage_options=options)
        counted = Tally(reader.storage)
        reader.info(which)
        row[name] = (counted.requests, counted.read_bytes)
    reader = SnapshotStore(url, storage_options=options)
    counted = Tally(reader.storage)
    itrs = reader.itrs()
    row["itrs"] = (counted.requests, counted.read_bytes, len(itrs))
    return row


def pair(cost: tuple[int, ...]) -> str:
    """Requests/bytes."""
    return f"{cost[0]}/{cost[1]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,10000")
    parser.add_argument("--saves", type=int, default=32, help="saves timed per run (whole seal cycles of 16)")
    parser.add_argument("--skip-s3", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    sizes = [int(s) for s in args.sizes.split(",")]
    places: dict[str, tuple[str, dict[str, Any]]] = {"local": (tempfile.mkdtemp(prefix="bench-commit-"), {})}
    servers_started: list[Any] = []
    if not args.skip_s3:
        import servers

        server = servers.s3_server()
        servers_started.append(server)
        places["s3"] = (f"s3://{server.create_bucket()}", servers.s3_storage_options(server))
    try:
        print(
            f"{'where':6} {'snapshots':>9} {'save ms':>8} {'manifest B/save':>15} {'req/save':>8} {'prune DEL':>9} "
            f"{'last req/B':>12} {'first req/B':>12} {'itr req/B':>12} {'itrs() req/B':>16}"
        )
        for where, (root, options) in places.items():
            rows = {}
            for count in sizes:
                row = measure(f"{root}/run-{uuid.uuid4().hex[:8]}", options, count, args.saves)
                rows[count] = row
                print(
                    f"{where:6} {count:>9} {row['save_ms']:>8.1f} {row['manifest_bytes']:>15.0f} "
                    f"{row['save_requests']:>8.1f} {row['prune_deletes']:>9.2f} "
                    f"{pair(row['last']):>12} {pair(row['first']):>12} {pair(row['itr']):>12} "
                    f"{pair(row['itrs']):>16}"
                )
            if len(sizes) > 1:
                small, big = rows[sizes[0]], rows[sizes[-1]]
                print(
                    f"{where:6} {sizes[-1]} vs {sizes[0]}: save time x{big['save_ms'] / small['save_ms']:.2f}, "
                    f"manifest bytes x{big['manifest_bytes'] / small['manifest_bytes']:.2f}"
                )
    finally:
        for server in servers_started:
            server.stop()


if __name__ == "__main__":
    main()
