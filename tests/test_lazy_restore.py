"""Lazy restore: loading one member reads only its byte range, counted through a wrapping filesystem."""

from __future__ import annotations

import torch

import counting_fs
from bucketsnap import SnapshotStore


def test_loading_the_policy_reads_only_its_bytes() -> None:
    store = SnapshotStore("countmem://lazy/run")
    policy = {"w": torch.randn(250_000)}  # 1 MB of float32
    store.save(1, {"policy": policy, "replay_buffer": torch.randn(50_000_000)})  # 200 MB
    assert store.info().size > 200_000_000

    counting_fs.CountingMemoryFileSystem.reset_counts()
    snap = store.open()
    restored = snap["policy"]
    read = counting_fs.CountingMemoryFileSystem.bytes_read
    assert torch.equal(restored["w"], policy["w"])
    assert read < 1.2 * 2**20, f"read {read} bytes to restore a 1 MB policy"
    assert counting_fs.CountingMemoryFileSystem.reads <= 3, "a manifest read, then one ranged read per 4 MiB"

    counting_fs.CountingMemoryFileSystem.reset_counts()
    store.load(keys=["policy"])
    assert counting_fs.CountingMemoryFileSystem.bytes_read < 1.2 * 2**20


def test_lookups_cost_a_constant_number_of_requests() -> None:
    store = SnapshotStore("countmem://lookups/run")
    costs = []
    for itr in range(40):
        store.save(itr, {"v": itr})
        counting_fs.CountingMemoryFileSystem.reset_counts()
        assert store.info("first").itr == 0
        costs.append(counting_fs.CountingMemoryFileSystem.reads)
    assert set(costs) == {1}, "one manifest read (plus one listing) whatever the number of snapshots"
    assert len(store.storage.list("manifest")) <= 13, "old manifest generations are pruned"
