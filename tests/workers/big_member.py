"""A process that saves or restores one big member and reports its memory, for the bounded-memory checks.

Usage: big_member.py save|restore URL NBYTES KIND [CONTAINER]; the storage options (JSON) in
BUCKETSNAP_WORKER_OPTIONS, SnapshotStore's keyword arguments (JSON) in BUCKETSNAP_WORKER_STORE. KIND is ``raw``
(random bytes: stored in raw blocks) or ``compressed`` (sparse bytes: compressed frames); CONTAINER is ``numpy``
(default) or ``torch``. Prints one JSON line: the resident memory before the operation, the peak during it (the
process's high-water mark, reset just before; and the peak of its anonymous memory, sampled), the seconds it
took, and a CRC-32 of the data (the restore's must equal the save's).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from zlib_ng.zlib_ng import crc32

from bucketsnap import SnapshotStore

_CHUNK = 64 * 2**20


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


class _AnonPeak:
    """The peak of the process's anonymous resident memory (RssAnon), sampled every 5 ms on a thread.

    VmHWM also counts file-backed pages (the libraries' code), which the kernel evicts under memory pressure
    from other processes, so that the high-water mark can then read below the data; anonymous memory (the
    arrays, bucketsnap's buffers, the clients') is what a save or restore allocates.
    """

    def __init__(self) -> None:
        self.before = self.peak = _status("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _status("RssAnon"))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status("RssAnon"))
        return self.peak


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size (Linux >= 4.0)


def _crc(data: np.ndarray) -> int:
    view = memoryview(data.reshape(-1).view(np.uint8))
    crc = 0
    for start in range(0, view.nbytes, _CHUNK):
        crc = crc32(view[start : start + _CHUNK], crc)
    return crc


def _make(nbytes: int, kind: str) -> np.ndarray:
    data = np.zeros(nbytes, dtype=np.uint8)  # touched below, page by page, so it is resident before the save
    rng = np.random.default_rng(0)
    for start in range(0, nbytes, _CHUNK):
        end = min(start + _CHUNK, nbytes)
        if kind == "raw":
            data[start:end] = np.frombuffer(rng.bytes(end - start), dtype=np.uint8)
        else:  # an Atari-like mostly-empty array: compresses a few hundred times
            data[start:end:4096] = rng.integers(1, 255, len(range(start, end, 4096)), dtype=np.uint8)
    return data


def main() -> None:
    op, url, nbytes, kind = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    container = sys.argv[5] if len(sys.argv) > 5 else "numpy"
    options: dict[str, Any] = json.loads(os.environ.get("BUCKETSNAP_WORKER_OPTIONS", "{}"))
    store = SnapshotStore(url, storage_options=options, **json.loads(os.environ.get("BUCKETSNAP_WORKER_STORE", "{}")))
    report: dict[str, Any] = {"op": op, "nbytes": nbytes, "kind": kind, "container": container}
    if op == "save":
        data = _make(nbytes, kind)
        value: Any = torch.from_numpy(data) if container == "torch" else data
        report["crc"] = _crc(data)
        report["rss_before"] = _status("VmRSS")
        _reset_peak()
        anon = _AnonPeak()
        started = time.perf_counter()
        store.save(1, {"table": value, "step": 1})
        report["seconds"] = time.perf_counter() - started
        report["peak"] = _status("VmHWM")
        anon.stop()
        member = store.info(1).members["table"]
        report["stored"], report["codec"] = member.stored_size, member.codec
    else:
        snap = store.open(1)
        report["rss_before"] = _status("VmRSS")
        _reset_peak()
        anon = _AnonPeak()
        started = time.perf_counter()
        value = snap["table"]
        report["seconds"] = time.perf_counter() - started
        report["peak"] = _status("VmHWM")
        anon.stop()
        data = value.numpy() if isinstance(value, torch.Tensor) else value
        report["crc"] = _crc(data)
    restored = nbytes if op == "restore" else 0
    report["overhead"] = report["peak"] - report["rss_before"] - restored
    report["anon_overhead"] = anon.peak - anon.before - restored
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
