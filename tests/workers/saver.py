"""A writer process for the crash and concurrency tests (tests/test_crash.py).

``save(url, options, first, step, count, size, conn)`` runs in a process of its own, forked from a forkserver
that has torch and bucketsnap imported already (a start in milliseconds, not the seconds of a new interpreter).
It saves itrs FIRST, FIRST+STEP, ... and sends "committed <itr>" on ``conn`` after each save returns; it sends
"ready" once its store is open. SIZE (floats) varies per itr so that kills land in small and multi-part saves
alike.
"""

from __future__ import annotations

from multiprocessing.connection import Connection
from typing import Any

import torch

from bucketsnap import SnapshotStore


def save(url: str, options: dict[str, Any], first: int, step: int, count: int, size: int, conn: Connection) -> None:
    store = SnapshotStore(url, storage_options=options, part_size=5 * 2**20)
    conn.send("ready")
    for i in range(count):
        itr = first + i * step
        generator = torch.Generator().manual_seed(itr)
        n = size * (1 + itr % 7)
        store.save(itr, {"policy": torch.randn(n, generator=generator), "itr": itr}, metrics={"itr": itr})
        conn.send(f"committed {itr}")
    conn.send(f"conflicts {store.conflicts}")
