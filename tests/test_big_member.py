"""Bounded memory for big snapshots: a member far larger than a save's buffers saves to and restores from the S3
server with a peak resident memory, above the data itself, well below the member's size.

docs/performance.md's "Bounded memory" section has the 10 GiB figures (``benchmarks/bench_memory.py``) and the
bound a save is documented to hold on S3: ``(upload_concurrency + 1) * part_size`` of part buffers plus at most
48 MiB. This is the scaled version: a 300 MiB member, in processes of its own (``tests/workers/big_member.py``
reports the peak, VmHWM reset just before the operation, and the sampled peak of anonymous memory; the larger
must be in bounds), raw with the store's default parts (16 MiB, 4 in flight: 80 MiB of buffers) and compressed
with the smallest (5 MiB, 2 in flight). A save that held the encoded or compressed member, or an S3 client that
copied the parts in flight (it did: 237 MiB for the raw save), or a restore that decompressed the member before
copying it into the array, would need far more and fail here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bucketsnap._frames import write_frames
from bucketsnap._storage import DEFAULT_PART_SIZE, DEFAULT_UPLOAD_CONCURRENCY
from conftest import Backend

WORKER = Path(__file__).parent / "workers" / "big_member.py"
MiB = 2**20
SIZE = 300 * MiB
#: A save's peak above the data, beyond its part buffers: the S3 client's service model, loaded on its first
#: request (13 MiB), its chunks of the parts in flight, the frames, threads, malloc's arenas; measured 20-29 MiB
#: at this size with either setting below (32 MiB for 10 GiB), 147 MiB for the raw save when the client copied
#: the parts in flight. docs/performance.md documents 48 MiB.
SAVE_EXTRA = 40 * MiB
#: A restore's peak above the array it restores: 8 ranged reads of 4 MiB in flight, the frame being decoded, the
#: client; measured 30-51 MiB.
RESTORE_BOUND = 96 * MiB
DEFAULTS = {"part_size": DEFAULT_PART_SIZE, "upload_concurrency": DEFAULT_UPLOAD_CONCURRENCY}
SMALLEST = {"part_size": 5 * MiB, "upload_concurrency": 2}


def _run(op: str, url: str, backend: Backend, kind: str, container: str, store: dict[str, int]) -> dict[str, Any]:
    env = {
        **os.environ,
        "BUCKETSNAP_WORKER_OPTIONS": json.dumps(backend.options),
        "BUCKETSNAP_WORKER_STORE": json.dumps(store),
    }
    done = subprocess.run(
        [sys.executable, str(WORKER), op, url, str(SIZE), kind, container],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, f"{op} failed:\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.s3
@pytest.mark.parametrize(
    ("kind", "container", "store"),
    [("raw", "numpy", DEFAULTS), ("compressed", "torch", SMALLEST)],
    ids=["raw", "compressed"],
)
def test_a_big_member_saves_and_restores_from_s3_in_bounded_memory(
    s3_backend: Backend, kind: str, container: str, store: dict[str, int]
) -> None:
    url = f"{s3_backend.base}/big-{uuid.uuid4().hex[:8]}"
    save = _run("save", url, s3_backend, kind, container, store)
    assert save["codec"] == "zstd-frames"
    assert (save["stored"] > SIZE) if kind == "raw" else (save["stored"] < SIZE / 50)
    buffers = (store["upload_concurrency"] + 1) * store["part_size"]
    held = max(save["overhead"], save["anon_overhead"])
    assert held < buffers + SAVE_EXTRA, (
        f"save of {SIZE >> 20} MiB held {held >> 20} MiB above the data ({buffers >> 20} MiB of part buffers)"
    )
    restore = _run("restore", url, s3_backend, kind, container, store)
    assert restore["crc"] == save["crc"], "the restored bytes differ"
    held = max(restore["overhead"], restore["anon_overhead"])
    assert held < RESTORE_BOUND, f"restore of {SIZE >> 20} MiB held {held >> 20} MiB above the array it restored"


@pytest.mark.azure
def test_a_big_raw_member_saves_to_azure_in_bounded_memory(azure_backend: Backend) -> None:
    """Azure's writer handed each block to the SDK as a bytes copy: 202 MiB above the data for this save, where a
    file object over the part buffer (as on S3) holds the buffers and little more."""
    url = f"{azure_backend.base}/big-{uuid.uuid4().hex[:8]}"
    save = _run("save", url, azure_backend, "raw", "numpy", DEFAULTS)
    buffers = (DEFAULTS["upload_concurrency"] + 1) * DEFAULTS["part_size"]
    held = max(save["overhead"], save["anon_overhead"])
    assert held < buffers + SAVE_EXTRA, f"save held {held >> 20} MiB above the data ({buffers >> 20} MiB of buffers)"
    restore = _run("restore", url, azure_backend, "raw", "numpy", DEFAULTS)
    assert restore["crc"] == save["crc"], "the restored bytes differ"


class _Discard:
    """A member's destination that keeps only the count of bytes written to it."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: Any) -> int:
        return self.write_pieces((data,))

    def write_pieces(self, pieces: Any, *, crc: int | None = None) -> int:
        n = sum(memoryview(p).nbytes for p in pieces)
        self.size += n
        return n


def test_the_tiny_frames_of_a_compressible_member_hold_only_their_own_size() -> None:
    """Frames wait in a batch of 16 MiB stored before they are written; zstd's output for each frame is an
    allocation of its bound (~1 MiB) with a page of it resident, so 10 GiB of zeros (10,240 frames of ~100 bytes)
    held 40 MiB more than bytes written. tracemalloc counts each frame's allocation: its own size, now."""
    data = np.zeros(128 * MiB, dtype=np.uint8)  # 128 frames of ~50 bytes, all waiting in one batch
    tracemalloc.start()
    try:
        count = write_frames(_Discard(), [memoryview(data)], level=3)  # type: ignore[arg-type]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 128
    assert peak < 8 * MiB, f"{count} frames of zeros held {peak / MiB:.0f} MiB while waiting for their batch"
