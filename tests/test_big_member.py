"""Bounded memory for big snapshots: a member far larger than a save's buffers saves to and restores from the S3
server with a peak resident memory, above the data itself, well below the member's size.

docs/performance.md's "Bounded memory" section has the 10 GiB figures (``benchmarks/bench_memory.py``); this is
the scaled version: a 300 MiB member, in processes of its own (``tests/workers/big_member.py`` reports the peak,
VmHWM reset just before the operation, and the sampled peak of anonymous memory; the larger must be in
bounds). A save that held the encoded or compressed member, or a restore that decompressed it before copying
it into the array, would need at least 300 MiB more and fail here. The upload
buffers are made small (2 parts of 5 MiB in flight) so that the bound is about bucketsnap's frames and reads,
not the uploader's parts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from conftest import Backend

WORKER = Path(__file__).parent / "workers" / "big_member.py"
MiB = 2**20
SIZE = 300 * MiB
#: Peak above the data: frames of 1 MiB, the uploader's 3 parts of 5 MiB, 8 ranged reads of 4 MiB in flight,
#: the interpreter's and the S3 client's own allocations; measured 48 MiB (save) and 21 MiB (restore).
BOUND = 120 * MiB
STORE = {"part_size": 5 * MiB, "upload_concurrency": 2}


def _run(op: str, url: str, backend: Backend, kind: str, container: str) -> dict[str, Any]:
    env = {
        **os.environ,
        "BUCKETSNAP_WORKER_OPTIONS": json.dumps(backend.options),
        "BUCKETSNAP_WORKER_STORE": json.dumps(STORE),
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
@pytest.mark.parametrize(("kind", "container"), [("raw", "numpy"), ("compressed", "torch")])
def test_a_big_member_saves_and_restores_from_s3_in_bounded_memory(
    s3_backend: Backend, kind: str, container: str
) -> None:
    url = f"{s3_backend.base}/big-{uuid.uuid4().hex[:8]}"
    save = _run("save", url, s3_backend, kind, container)
    assert save["codec"] == "zstd-frames"
    assert (save["stored"] > SIZE) if kind == "raw" else (save["stored"] < SIZE / 50)
    held = max(save["overhead"], save["anon_overhead"])
    assert held < BOUND, f"save of {SIZE >> 20} MiB held {held >> 20} MiB above the data"
    restore = _run("restore", url, s3_backend, kind, container)
    assert restore["crc"] == save["crc"], "the restored bytes differ"
    held = max(restore["overhead"], restore["anon_overhead"])
    assert held < BOUND, f"restore of {SIZE >> 20} MiB held {held >> 20} MiB above the array it restored"
