"""A writer process for the crash and concurrency tests.

Usage: saver.py URL OPTIONS_JSON FIRST STEP COUNT [SIZE]. Saves itrs FIRST, FIRST+STEP, ... and prints
"committed <itr>" after each save returns; prints "ready" once imported. SIZE (floats) varies per itr so
that kills land in small and multi-part saves alike.
"""

from __future__ import annotations

import json
import sys

import torch

from bucketsnap import SnapshotStore


def main() -> None:
    url, options, first, step, count = sys.argv[1], json.loads(sys.argv[2]), *map(int, sys.argv[3:6])
    size = int(sys.argv[6]) if len(sys.argv) > 6 else 200_000
    store = SnapshotStore(url, storage_options=options, part_size=5 * 2**20)
    print("ready", flush=True)
    for i in range(count):
        itr = first + i * step
        generator = torch.Generator().manual_seed(itr)
        n = size * (1 + itr % 7)
        store.save(itr, {"policy": torch.randn(n, generator=generator), "itr": itr}, metrics={"itr": itr})
        print(f"committed {itr}", flush=True)
    print(f"conflicts {store.conflicts}", flush=True)


if __name__ == "__main__":
    main()
