"""Saving and restoring an RL policy with its optimizer: bucketsnap against what users do today.

The state is an MLP policy of about 134 MB of float32 weights (256 -> 4096 -> 4096 -> 3840 -> 16) with its
Adam state after one step (exp_avg and exp_avg_sq: about 402 MB in all), as ``{"policy": model.state_dict(),
"optimizer": optimizer.state_dict(), "step": 1}``. Every alternative saves that same object, in the same
process, to local disk, to S3 (LocalStack, started by this script as a separate process through
``tests/servers.py``, or the endpoint in ``BUCKETSNAP_TEST_S3_ENDPOINT``), with ``--gcs`` to GCS
(fake-gcs-server, likewise) and with ``--azure`` to Azure Blob Storage (Azurite, likewise):

* ``torch.save`` to a local file, and through ``fsspec.open(url, "wb")`` to S3 and GCS; locally also
  followed by ``os.fsync``, which bucketsnap does before committing (remotely that row repeats ``torch.save``);
* PyTorch DCP, ``dcp.save(state, storage_writer=FsspecWriter(url), no_dist=True)``;
* bucketsnap ``SnapshotStore.save`` (blocking), also with ``upload_concurrency=1`` (one part uploaded at a
  time: on GCS, gcsfs's resumable upload instead of a parallel composite upload);
* bucketsnap ``save_async``: the stall is the time until it returns (the training loop's cost), the total the
  time until the snapshot is committed; the first save_async of a store is reported apart (it allocates the
  host copy, which later saves reuse);
* restoring the policy alone from S3 (what an inference host does): bucketsnap ``load(keys=["policy"])`` and
  DCP ``dcp.load({"policy": ...})`` versus ``torch.load`` of the whole object, in seconds and bytes read;
* the reader's own CPU: seconds of CPU per GB restored from ``memory://`` (no network), user and system apart,
  for the whole snapshot, the policy alone and a compressible member (``--cpu-only``: that table alone);
* against the store's ceiling (``benchmarks/_ceiling.py``), on each object store: bucketsnap's blocking save,
  whole restore and policy-only restore, each next to the same store's raw transfer of the same bytes in the
  same run (parts of bucketsnap's part size at its upload concurrency, ranged GETs of its read chunk at its
  read-ahead), as a fraction of it, with the load average.

Each figure is the median of ``--runs`` runs; ratios are to the first alternative (``torch.save``, or
``torch.load`` for restores). Run::

    python benchmarks/bench_save.py [--runs 3] [--skip-s3] [--gcs] [--azure] [--small] [--ceiling-only | --cpu-only]
"""

from __future__ import annotations

import argparse
import functools
import gc
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

import fsspec
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _ceiling import Ceiling, fraction

from bucketsnap import SnapshotStore

MB = 1e6


def make_state(small: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    width = 512 if small else 4096
    model = nn.Sequential(
        nn.Linear(256, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, width - 256),
        nn.ReLU(),
        nn.Linear(width - 256, 16),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(32, 256)).square().mean().backward()
    optimizer.step()
    return {"policy": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 1}


def nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    return 0


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    gc.collect()
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def median(runs: int, make: Callable[[], Callable[[], Any]], cleanup: Callable[[], None] = lambda: None) -> float:
    """Median seconds of ``runs`` calls of a fresh ``make()``, cleaning up between runs."""
    times = []
    for _ in range(runs):
        fn = make()
        times.append(timed(fn)[0])
        cleanup()
    return statistics.median(times)


class Places:
    """Fresh destinations on local disk and object stores (``remotes``: name -> (root URL, options))."""

    def __init__(self, local_root: str, remotes: dict[str, tuple[str, dict[str, Any]]]) -> None:
        self.local_root = local_root
        self.remotes = remotes

    def url(self, where: str, name: str) -> str:
        unique = f"{name}-{uuid.uuid4().hex[:8]}"
        if where == "local":
            return os.path.join(self.local_root, unique)
        return f"{self.remotes[where][0]}/{unique}"

    def options(self, where: str) -> dict[str, Any]:
        return {} if where == "local" else dict(self.remotes[where][1])

    def clear(self, where: str) -> None:
        if where == "local":
            for entry in os.listdir(self.local_root):
                path = os.path.join(self.local_root, entry)
                shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
        else:
            fs, root = fsspec.core.url_to_fs(self.remotes[where][0], **self.remotes[where][1])
            fs.invalidate_cache()
            for entry in fs.ls(root, detail=False):
                fs.rm(entry, recursive=True)
            fs.invalidate_cache()


def torch_save(places: Places, where: str, state: dict[str, Any]) -> Callable[[], Any]:
    url = places.url(where, "torch.pt")
    if where == "local":
        return lambda: torch.save(state, url)

    def save() -> None:
        with fsspec.open(url, "wb", **places.options(where)) as f:
            torch.save(state, f)

    return save


def torch_save_fsync(places: Places, where: str, state: dict[str, Any]) -> Callable[[], Any]:
    """torch.save, then fsync: as durable as bucketsnap's local save (which fsyncs before its rename)."""
    url = places.url(where, "torch-fsync.pt")
    if where != "local":
        return torch_save(places, where, state)

    def save() -> None:
        with open(url, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())

    return save


def dcp_save(places: Places, where: str, state: dict[str, Any]) -> Callable[[], Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    url = places.url(where, "dcp")
    if where != "local":
        return lambda: dcp.save(state, storage_writer=FsspecWriter(url, **places.options(where)), no_dist=True)
    return lambda: dcp.save(state, storage_writer=FsspecWriter(url), no_dist=True)


def bucketsnap_save(places: Places, where: str, state: dict[str, Any], **options: Any) -> Callable[[], Any]:
    """A blocking save; ``options`` go to the store (``upload_concurrency=1``: on GCS, gcsfs's resumable upload)."""
    store = SnapshotStore(places.url(where, "bsnap"), storage_options=places.options(where), **options)
    return lambda: store.save(1, state)


def bucketsnap_async(places: Places, where: str, state: dict[str, Any], runs: int) -> tuple[float, float, float]:
    """Stall of a store's first save_async, then median stall and total (until committed) of ``runs`` more.

    A training loop keeps one store and saves every N steps: its first save_async allocates the host copy,
    later ones copy into the same buffers. Each save is awaited, then deleted (as the other rows clear their
    files between runs: this VM's disk writes new blocks far more slowly while earlier files are kept).
    """
    store = SnapshotStore(places.url(where, "bsnap-async"), storage_options=places.options(where))
    stalls, totals = [], []
    for itr in range(runs + 1):
        gc.collect()
        start = time.perf_counter()
        future = store.save_async(itr, state)
        stalls.append(time.perf_counter() - start)
        future.result()
        totals.append(time.perf_counter() - start)
        store.delete(itr)
    store.close()
    places.clear(where)
    return stalls[0], statistics.median(stalls[1:]), statistics.median(totals[1:])


def restores(places: Places, state: dict[str, Any], runs: int) -> list[tuple[str, float, int]]:
    """Policy-only restores from S3: (name, median seconds, bytes read)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    options = places.options("s3")
    torch_url = places.url("s3", "restore.pt")
    with fsspec.open(torch_url, "wb", **options) as f:
        torch.save(state, f)
    torch_size = fsspec.core.url_to_fs(torch_url, **options)[0].size(torch_url)
    dcp_url = places.url("s3", "restore-dcp")
    dcp.save(state, storage_writer=FsspecWriter(dcp_url, **options), no_dist=True)
    bsnap_url = places.url("s3", "restore-bsnap")
    SnapshotStore(bsnap_url, storage_options=options).save(1, state)

    def torch_load() -> Any:
        with fsspec.open(torch_url, "rb", **options) as f:
            return torch.load(f, weights_only=True)["policy"]

    def dcp_load() -> Any:
        target = {"policy": {k: torch.empty_like(v) for k, v in state["policy"].items()}}
        dcp.load(target, storage_reader=FsspecReader(dcp_url, **options), no_dist=True)
        return target["policy"]

    read: list[int] = []

    def bsnap_load() -> Any:
        store = SnapshotStore(bsnap_url, storage_options=options)
        policy = store.load("last", keys=["policy"])["policy"]
        read.append(store.storage.bytes_read)
        return policy

    out = []
    for name, fn, size in [
        ("torch.load, whole object", torch_load, torch_size),
        ("DCP dcp.load, policy only", dcp_load, -1),
        ("bucketsnap load(keys=['policy'])", bsnap_load, 0),
    ]:
        times = []
        for _ in range(runs):
            seconds, policy = timed(fn)
            assert all(torch.equal(policy[k], state["policy"][k]) for k in state["policy"])
            times.append(seconds)
        out.append((name, statistics.median(times), read[-1] if size == 0 else size))
    places.clear("s3")
    return out


def against_ceiling(places: Places, where: str, state: dict[str, Any], runs: int) -> list[tuple[str, ...]]:
    """bucketsnap's save, whole restore and policy restore on ``where``, each against the store's raw transfer
    of the same bytes, interleaved run by run (the order alternates, so that a change in load hits both).

    The saves are a training loop's: one store, a first save not timed (it makes the first contact and probes
    the exclusive create), then one save per run. Each restore is an inference host's: a new store object, as
    ``restores`` opens. Rows: (operation, MB, bucketsnap s, ceiling s, of which publishing the parts, fraction,
    1-minute load average range).
    """
    options = places.options(where)
    url = places.url(where, "bsnap-ceiling")
    store = SnapshotStore(url, storage_options=options)
    storage = store.storage
    ceiling = Ceiling(
        places.url(where, "ceiling"),
        options,
        part_size=storage.part_size,
        upload_concurrency=storage.upload_concurrency,
    )
    store.save(0, state)
    times: dict[str, list[tuple[float, float]]] = {"save": [], "restore, whole": [], "restore, policy only": []}
    sizes: dict[str, int] = {}
    loads: list[float] = []

    def bsnap_save(itr: int) -> float:
        seconds = timed(lambda: store.save(itr, state))[0]
        store.delete(itr - 1)
        sizes["save"] = store.info(itr).size
        return seconds

    def bsnap_load(name: str, keys: list[str] | None) -> float:
        reader = SnapshotStore(url, storage_options=options)
        seconds, loaded = timed(lambda: reader.load("last", keys=keys))
        sizes[name] = reader.storage.bytes_read
        assert all(torch.equal(loaded["policy"][k], v) for k, v in state["policy"].items())
        return seconds

    def both(name: str, bsnap: Callable[[], float], raw: Callable[[], float], ceiling_first: bool) -> None:
        gc.collect()
        if ceiling_first:
            raw_s = raw()
            times[name].append((bsnap(), raw_s))
        else:
            bsnap_s = bsnap()
            times[name].append((bsnap_s, raw()))

    put: list[str] = []  # the ceiling's object of this run

    publish: list[float] = []

    def raw_put() -> float:
        seconds, path = ceiling.put(sizes["save"])
        put[:] = [path]
        publish.append(ceiling.publish_s)
        return seconds

    for run in range(runs):  # run 0 goes bucketsnap first: the ceiling's transfers take bucketsnap's sizes
        loads.append(os.getloadavg()[0])
        ceiling_first = run % 2 == 1

        both("save", lambda run=run: bsnap_save(run + 1), raw_put, ceiling_first)
        for name, keys in [("restore, whole", None), ("restore, policy only", ["policy"])]:
            raw_get = functools.partial(lambda path, name: ceiling.get(path, sizes[name]), put[0], name)
            both(name, functools.partial(bsnap_load, name, keys), raw_get, ceiling_first)
        ceiling.delete(put[0])
    loads.append(os.getloadavg()[0])
    store.close()
    places.clear(where)
    load = f"{min(loads):.1f}-{max(loads):.1f}"
    rows = []
    for name, pairs_s in times.items():
        bsnap_s = statistics.median(b for b, _ in pairs_s)
        raw_s = statistics.median(r for _, r in pairs_s)
        share = statistics.median(fraction(r, b) for b, r in pairs_s)
        published = f"{statistics.median(publish):.2f}" if name == "save" else ""
        rows.append(
            (name, f"{sizes[name] / MB:.0f}", f"{bsnap_s:.2f}", f"{raw_s:.2f}", published, f"{share:.0%}", load)
        )
    return rows


def restore_cpu(state: dict[str, Any], runs: int) -> list[tuple[str, ...]]:
    """CPU seconds per GB restored from ``memory://`` (no network: the reader's own work), user and system apart,
    for the whole snapshot, the policy alone, and a compressible member (100 MB of uint8 frames-like data):
    the least of ``runs`` restores, each by a new store. Rows: (restore, MB, user s/GB, sys s/GB, wall s/GB)."""
    import resource

    url = f"memory://bench-cpu-{uuid.uuid4().hex[:8]}"
    frames = (torch.arange(100_000_000) % 251 < 16).to(torch.uint8)  # compresses ~40x, as masks and frames do
    SnapshotStore(url).save(1, state)
    SnapshotStore(url).save(2, {"frames": frames})
    rows = []
    for name, itr, keys in [("whole", 1, None), ("policy only", 1, ["policy"]), ("compressed member", 2, None)]:
        best: tuple[float, float, float] | None = None
        for _ in range(runs):
            gc.collect()
            before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            loaded = SnapshotStore(url).load(itr, keys=keys)
            wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
            gb = nbytes(loaded) / 1e9
            row = ((after.ru_utime - before.ru_utime) / gb, (after.ru_stime - before.ru_stime) / gb, wall / gb)
            best = row if best is None or sum(row[:2]) < sum(best[:2]) else best
            del loaded
        assert best is not None
        rows.append((name, f"{gb * 1e3:.0f}", *(f"{x:.2f}" for x in best)))
    fsspec.filesystem("memory").rm(url.removeprefix("memory://"), recursive=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-s3", action="store_true", help="no S3 column (and no restores)")
    parser.add_argument("--gcs", action="store_true", help="add a GCS column (fake-gcs-server)")
    parser.add_argument("--azure", action="store_true", help="add an Azure Blob Storage column (Azurite)")
    parser.add_argument("--small", action="store_true", help="a 4 MB state, to check the script runs")
    parser.add_argument("--dir", default=None, help="local directory for the local-disk runs")
    parser.add_argument("--ceiling-only", action="store_true", help="only the table against the store's ceiling")
    parser.add_argument("--cpu-only", action="store_true", help="only the restore CPU per GB from memory://")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    state = make_state(args.small)
    size = nbytes(state)
    print(f"state: policy {nbytes(state['policy']) / MB:.0f} MB, total {size / MB:.0f} MB; {args.runs} runs each")
    if args.cpu_only or not args.ceiling_only:
        print(f"\n| restore from memory:// (load {os.getloadavg()[0]:.1f}) | MB | user s/GB | sys s/GB | wall s/GB |")
        print("|---|---:|---:|---:|---:|")
        for row in restore_cpu(state, args.runs):
            print("| " + " | ".join(row) + " |")
        if args.cpu_only:
            return
    local_root = tempfile.mkdtemp(prefix="bench-save-", dir=args.dir)
    started_servers: list[Any] = []
    remotes: dict[str, tuple[str, dict[str, Any]]] = {}
    import servers

    if not args.skip_s3:
        started = time.perf_counter()
        server = servers.s3_server()
        started_servers.append(server)
        remotes["s3"] = (f"s3://{server.create_bucket()}", servers.s3_storage_options(server))
        print(f"S3: {server.endpoint_url} (ready in {time.perf_counter() - started:.1f} s)")
    if args.gcs:
        gcs = servers.gcs_server()
        started_servers.append(gcs)
        remotes["gcs"] = (f"gs://{gcs.create_bucket()}", servers.gcs_storage_options(gcs))
        print(f"GCS: {gcs.endpoint_url}")
    if args.azure:
        azure = servers.azure_server()
        started_servers.append(azure)
        remotes["azure"] = (f"az://{azure.create_container()}", servers.azure_storage_options(azure))
        print("Azure: Azurite")
    places = Places(local_root, remotes)
    wheres = ["local", *remotes]
    try:
        rows: dict[str, dict[str, float]] = {}
        for where in [] if args.ceiling_only else wheres:
            for name, make in [
                ("torch.save", torch_save),
                ("torch.save + fsync (local)", torch_save_fsync),
                ("DCP dcp.save (FsspecWriter)", dcp_save),
                ("bucketsnap save (blocking)", bucketsnap_save),
                ("bucketsnap save, upload_concurrency=1", functools.partial(bucketsnap_save, upload_concurrency=1)),
            ]:
                rows.setdefault(name, {})[where] = median(
                    args.runs,
                    lambda make=make, where=where: make(places, where, state),
                    lambda where=where: places.clear(where),
                )
            first, stall, total = bucketsnap_async(places, where, state, args.runs)
            rows.setdefault("bucketsnap save_async: stall, a store's first save", {})[where] = first
            rows.setdefault("bucketsnap save_async: stall, later saves", {})[where] = stall
            rows.setdefault("bucketsnap save_async: until committed, later saves", {})[where] = total
        if remotes:
            print()
            print(
                "| against the store's ceiling | MB | bucketsnap: s | ceiling: s | ceiling: publishing, s "
                "| of the ceiling | load (1 min) |"
            )
            print("|---|---:|---:|---:|---:|---:|---:|")
            for where in remotes:
                for row in against_ceiling(places, where, state, args.runs):
                    print(f"| {where}: {row[0]} | " + " | ".join(row[1:]) + " |")
        if args.ceiling_only:
            return
        print()
        print("| save, " + f"{size / MB:.0f} MB | " + " | ".join(f"{w}: s | ratio" for w in wheres) + " |")
        print("|---|" + "---:|---:|" * len(wheres))
        for name, by_where in rows.items():
            cells = []
            for where in wheres:
                base = rows["torch.save"][where]
                cells.append(f"{by_where[where]:.2f} | {by_where[where] / base:.2f}x")
            print(f"| {name} | " + " | ".join(cells) + " |")
        if "s3" in remotes:
            print()
            print("| restore the policy from S3 | s | ratio | MB read | ratio |")
            print("|---|---:|---:|---:|---:|")
            results = restores(places, state, args.runs)
            base_s, base_b = results[0][1], results[0][2]
            for name, seconds, read in results:
                mb = f"{read / MB:.0f} | {read / base_b:.2f}x" if read >= 0 else "not measured | "
                print(f"| {name} | {seconds:.2f} | {seconds / base_s:.2f}x | {mb} |")
    finally:
        shutil.rmtree(local_root, ignore_errors=True)
        for started_server in started_servers:
            started_server.stop()


if __name__ == "__main__":
    main()
