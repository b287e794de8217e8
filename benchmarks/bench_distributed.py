"""Distributed saves: aggregate throughput of 1, 2 and 4 gloo ranks each writing its shard to the S3 test server.

Every rank holds one shard of ``--shard-mib`` MiB of random float32 (incompressible: what optimizer state and
weights look like to zstd). bucketsnap saves it as ``{"optimizer": Sharded(shard)}`` (one archive per rank,
one commit by rank 0); PyTorch DCP saves the same tensors with ``dcp.save`` and ``FsspecWriter`` (one
``.distcp`` file per rank plus ``.metadata`` written by the coordinator). DCP treats a plain tensor under the
same key on every rank as replicated and writes it once, so its state uses a per-rank key
(``optimizer.rank<r>``) to make every rank write its own shard, as with bucketsnap.

A save is timed on rank 0 from a barrier before it to a barrier after it (so it includes the slowest rank
and the commit); aggregate throughput is ``world * shard bytes / that time``. Each configuration runs
``--repeats`` times after one warm-up save; the median is reported. The S3 server is LocalStack on 127.0.0.1,
started through ``tests/servers.py`` (or ``BUCKETSNAP_TEST_S3_ENDPOINT``). Run::

    python benchmarks/bench_distributed.py [--shard-mib 64] [--repeats 3] [--worlds 1 2 4]

Not part of the test run; it takes a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def worker(rank: int, world: int, init: str, base: str, options: dict[str, Any], shard_mib: int, repeats: int) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    from bucketsnap import Sharded, SnapshotStore

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world, timeout=timedelta(300))
    numel = shard_mib * 2**20 // 4
    shard = torch.randn(numel, generator=torch.Generator().manual_seed(rank))
    store = SnapshotStore(f"{base}/bucketsnap-w{world}", storage_options=options)

    def bucketsnap_save(i: int) -> None:
        store.save(i, {"optimizer": Sharded(shard)})

    def dcp_save(i: int) -> None:
        # sync_files=False: fsync on an s3fs stream fails (there is no file descriptor)
        writer = FsspecWriter(f"{base}/dcp-w{world}/{i}", sync_files=False, **options)
        dcp.save({f"optimizer.rank{rank}": shard}, storage_writer=writer)

    results: dict[str, list[float]] = {}
    for name, save in (("bucketsnap", bucketsnap_save), ("dcp", dcp_save)):
        times = []
        for i in range(repeats + 1):
            dist.barrier()
            start = time.perf_counter()
            save(i)
            dist.barrier()
            if i:  # the first save warms up connections and imports
                times.append(time.perf_counter() - start)
        results[name] = times
    if rank == 0:
        print(json.dumps(results), flush=True)
    dist.destroy_process_group()


def run(world: int, base: str, options: dict[str, Any], shard_mib: int, repeats: int) -> dict[str, list[float]]:
    init = os.path.join(tempfile.mkdtemp(), f"init-{uuid.uuid4().hex}")
    args = [base, json.dumps(options), str(shard_mib), str(repeats)]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", str(r), str(world), init, *args],
            stdout=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    try:
        outputs = [p.communicate(timeout=480)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    if any(p.returncode for p in procs):
        raise SystemExit(f"world {world}: a rank failed: {[p.returncode for p in procs]}")
    result: dict[str, list[float]] = json.loads(outputs[0].strip().splitlines()[-1])
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        rank, world = int(sys.argv[2]), int(sys.argv[3])
        init, base, options = sys.argv[4], sys.argv[5], json.loads(sys.argv[6])
        worker(rank, world, init, base, options, int(sys.argv[7]), int(sys.argv[8]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--shard-mib", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "tests"))
    import servers

    server = servers.s3_server()
    try:
        bucket = server.create_bucket()
        options = servers.s3_storage_options(server)
        base = f"s3://{bucket}/bench-{uuid.uuid4().hex[:8]}"
        print(f"S3 server: {server.endpoint_url}; {os.cpu_count()} CPU cores; shard {args.shard_mib} MiB per rank")
        print("| ranks | data per save | bucketsnap save | bucketsnap MB/s | DCP save | DCP MB/s |")
        print("|---:|---:|---:|---:|---:|---:|")
        for world in args.worlds:
            result = run(world, base, options, args.shard_mib, args.repeats)
            total = world * args.shard_mib * 2**20
            row = [f"{world}", f"{world * args.shard_mib} MiB"]
            for name in ("bucketsnap", "dcp"):
                seconds = statistics.median(result[name])
                row += [f"{seconds:.2f} s", f"{total / seconds / 1e6:.0f}"]
            print("| " + " | ".join(row) + " |", flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
