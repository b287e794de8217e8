"""DCP through bucketsnap against DCP's own writers: save and load times, as ratios, on local disk and S3.

One process (no process group) saves a model-like state of float32 tensors (random: incompressible) with
``dcp.save`` through ``bucketsnap.dcp.SnapshotWriter`` and through DCP's own writer for the store:
``FileSystemWriter`` on local disk, ``FsspecWriter(sync_files=False)`` through s3fs on the S3 test server
(LocalStack on 127.0.0.1, started through ``tests/servers.py``, or ``BUCKETSNAP_TEST_S3_ENDPOINT``). Then it
loads each checkpoint whole with ``dcp.load`` into preallocated tensors (``SnapshotReader`` against
``FileSystemReader``/``FsspecReader``), and one tensor of bucketsnap's, counting the bytes that read fetched.
Each figure is the median of ``--repeats`` runs after one warm-up; the two libraries alternate. Run::

    python benchmarks/bench_dcp.py [--size-mib 256] [--tensors 32] [--repeats 3] [--stores local s3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

from bucketsnap import SnapshotStore
from bucketsnap.dcp import SnapshotReader, SnapshotWriter

REPO = Path(__file__).resolve().parents[1]
warnings.simplefilter("ignore")  # DCP's "assuming the intent is to save in a single process"


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def empty_like(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.empty_like(v) for k, v in state.items()}


def one_round(name: str, base: str, run: str, i: int, options: dict[str, Any], state: dict) -> dict[str, float]:
    """Seconds of each library's save and load of ``state`` (itr ``i`` of bucketsnap's run)."""
    dcp_path = f"{base}/dcp-{uuid.uuid4().hex[:8]}-{i}"
    if name == "local":
        writer: Any = dcp.FileSystemWriter(dcp_path)
        reader: Any = dcp.FileSystemReader
    else:
        writer = FsspecWriter(dcp_path, sync_files=False, **options)
        reader = FsspecReader
    ours = SnapshotWriter(run, itr=i, storage_options=options)
    results = {
        "bs_save": timed(lambda: dcp.save(state, storage_writer=ours)),
        "dcp_save": timed(lambda: dcp.save(state, storage_writer=writer)),
    }
    for key, make_reader in (
        ("bs_load", lambda: SnapshotReader(run, i, storage_options=options)),
        ("dcp_load", lambda: reader(dcp_path) if name == "local" else reader(dcp_path, **options)),
    ):
        out = empty_like(state)
        results[key] = timed(lambda: dcp.load(out, storage_reader=make_reader()))  # noqa: B023 - called at once
        assert all(torch.equal(out[k], state[k]) for k in state)
    return results


def bench_store(name: str, base: str, options: dict[str, Any], state: dict[str, torch.Tensor], repeats: int) -> dict:
    """Median seconds of each operation on one store, and the bytes a one-tensor load read."""
    times: dict[str, list[float]] = {k: [] for k in ("bs_save", "dcp_save", "bs_load", "dcp_load")}
    run = f"{base}/bucketsnap-{uuid.uuid4().hex[:8]}"
    for i in range(repeats + 1):
        results = one_round(name, base, run, i, options, state)
        if i:  # the first round warms up connections, imports and the page cache
            for key, seconds in results.items():
                times[key].append(seconds)
    store = SnapshotStore(run, storage_options=options)
    key = next(iter(state))
    dcp.load({key: torch.empty_like(state[key])}, storage_reader=SnapshotReader(store))
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {**medians, "one_tensor_read": store.storage.bytes_read, "one_tensor": state[key].nbytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--tensors", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stores", nargs="+", default=["local", "s3"], choices=["local", "s3"])
    args = parser.parse_args()
    rows = args.size_mib * 2**20 // 4 // args.tensors // 1024
    gen = torch.Generator().manual_seed(0)
    state = {f"layers.{i}.weight": torch.randn(rows, 1024, generator=gen) for i in range(args.tensors)}
    total = sum(t.nbytes for t in state.values())
    print(
        f"{os.cpu_count()} CPU cores; torch {torch.__version__}; {args.tensors} float32 tensors, "
        f"{total / 2**20:.0f} MiB"
    )
    print("| store | bucketsnap save | DCP save | save ratio | bucketsnap load | DCP load | load ratio | one tensor |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    server = None
    tmp = tempfile.mkdtemp(prefix="bench-dcp-")
    try:
        for name in args.stores:
            options: dict[str, Any] = {}
            base = tmp
            if name == "s3":
                sys.path.insert(0, str(REPO / "tests"))
                import servers

                server = servers.s3_server()
                options = servers.s3_storage_options(server)
                base = f"s3://{server.create_bucket()}"
            r = bench_store(name, base, options, state, args.repeats)
            mb = total / 1e6
            print(
                f"| {name} | {r['bs_save']:.2f} s ({mb / r['bs_save']:.0f} MB/s) | {r['dcp_save']:.2f} s "
                f"({mb / r['dcp_save']:.0f} MB/s) | {r['dcp_save'] / r['bs_save']:.2f} | {r['bs_load']:.2f} s "
                f"({mb / r['bs_load']:.0f} MB/s) | {r['dcp_load']:.2f} s ({mb / r['dcp_load']:.0f} MB/s) | "
                f"{r['dcp_load'] / r['bs_load']:.2f} | {r['one_tensor_read'] / 2**20:.3f} MiB of "
                f"{total / 2**20:.0f} (tensor {r['one_tensor'] / 2**20:.3f} MiB) |",
                flush=True,
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
