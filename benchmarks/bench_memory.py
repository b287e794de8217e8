"""Bounded memory for big snapshots: peak resident memory of saving and restoring one big member, above the data.

Usage: ``python benchmarks/bench_memory.py [--size 10G] [--kinds raw,compressed] [--where s3,local,gcs,azure]
[--part-size 16M] [--concurrency 4]``; ``--small`` is ``--size 300M``. Each save and each restore runs in a
fresh process (``tests/workers/big_member.py``) that reports its resident memory before the operation and its
high-water mark during it (``/proc/self/status`` VmHWM, reset just before the operation); the figure is the peak
above what the process held before (the array itself, for a save), and for a restore above the array it
restores. S3 is the test server (LocalStack where its venv exists, else moto's server;
``BUCKETSNAP_TEST_S3_ENDPOINT`` for another), GCS and Azure the emulators of :mod:`bucketsnap.testing`. A save
to S3 is documented to hold at most ``(upload_concurrency + 1) * part_size`` of part buffers plus 48 MiB above
the data (docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from bucketsnap._storage import DEFAULT_PART_SIZE, DEFAULT_UPLOAD_CONCURRENCY

HERE = Path(__file__).resolve().parent
WORKER = HERE.parent / "tests" / "workers" / "big_member.py"
sys.path.insert(0, str(HERE.parent / "tests"))

MB = 2**20


def parse_size(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    text = text.strip().upper().removesuffix("B")
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def run_worker(
    op: str, url: str, options: dict[str, Any], nbytes: int, kind: str, container: str, **store: Any
) -> dict[str, Any]:
    """One save or restore in a fresh process (``store``: SnapshotStore's keyword arguments); its report."""
    env = {**os.environ, "BUCKETSNAP_WORKER_OPTIONS": json.dumps(options), "BUCKETSNAP_WORKER_STORE": json.dumps(store)}
    done = subprocess.run(
        [sys.executable, str(WORKER), op, url, str(nbytes), kind, container],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{op} worker failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def figure(report: dict[str, Any]) -> str:
    """``<VmHWM-based> / <anonymous>`` MiB above the data (see tests/workers/big_member.py for the two)."""
    return f"{report['overhead'] / MB:,.0f} / {report['anon_overhead'] / MB:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="10G", help="member size (10G, 300M, ...)")
    parser.add_argument("--small", action="store_true", help="--size 300M")
    parser.add_argument("--kinds", default="raw,compressed", help="raw (random bytes), compressed (sparse bytes)")
    parser.add_argument("--where", default="s3", help="s3, local, gcs, azure, or several (s3,local)")
    parser.add_argument("--container", default="numpy", choices=["numpy", "torch"])
    parser.add_argument("--part-size", default=str(DEFAULT_PART_SIZE), help="SnapshotStore's part_size (16M, ...)")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_UPLOAD_CONCURRENCY, help="upload_concurrency")
    args = parser.parse_args()
    store = {"part_size": parse_size(args.part_size), "upload_concurrency": args.concurrency}
    nbytes = parse_size("300M" if args.small else args.size)
    places: dict[str, tuple[str, dict[str, Any]]] = {}
    started: list[Any] = []
    import servers

    if "s3" in args.where:
        server = servers.s3_server()
        started.append(server)
        options = servers.s3_storage_options(server)
        # LocalStack assembles a multipart upload before it answers CompleteMultipartUpload (AWS answers at once
        # and sends whitespace while it works), longer than s3fs's 15 s read timeout for a 10 GiB object.
        options["config_kwargs"] = {**options["config_kwargs"], "read_timeout": 600}
        places["s3"] = (f"s3://{server.create_bucket()}", options)
        print(f"S3: {server.endpoint_url}")
    if "gcs" in args.where:
        gcs = servers.gcs_server()
        started.append(gcs)
        places["gcs"] = (f"gs://{gcs.create_bucket()}", servers.gcs_storage_options(gcs))
    if "azure" in args.where:
        azure = servers.azure_server()
        started.append(azure)
        places["azure"] = (f"az://{azure.create_container()}", servers.azure_storage_options(azure))
    local_root = tempfile.mkdtemp(prefix="bench-memory-")
    if "local" in args.where:
        places["local"] = (local_root, {})
    print(f"member: {nbytes / MB:,.0f} MiB ({args.container}); parts of {store['part_size'] / MB:,.0f} MiB, "
          f"{args.concurrency} in flight; peak resident memory above the data, MiB "
          "(high-water mark / anonymous memory)")  # fmt: skip
    print(f"{'where':6} {'kind':10} {'codec':12} {'stored MiB':>11} {'save s':>7} {'save +MiB':>14} "
          f"{'restore s':>9} {'restore +MiB':>14}")  # fmt: skip
    try:
        for where, (base, options) in places.items():
            for kind in args.kinds.split(","):
                url = f"{base}/mem-{kind}-{uuid.uuid4().hex[:6]}"
                save = run_worker("save", url, options, nbytes, kind, args.container, **store)
                restore = run_worker("restore", url, options, nbytes, kind, args.container, **store)
                if restore["crc"] != save["crc"]:
                    raise SystemExit(f"{where} {kind}: the restored data differs from the saved data")
                print(
                    f"{where:6} {kind:10} {save['codec']:12} {save['stored'] / MB:11,.0f} {save['seconds']:7.1f} "
                    f"{figure(save):>14} {restore['seconds']:9.1f} {figure(restore):>14}",
                    flush=True,
                )
    finally:
        shutil.rmtree(local_root, ignore_errors=True)
        for each in started:
            each.stop()


if __name__ == "__main__":
    main()
