"""Lazy restore: loading one member reads only its byte range, counted through a wrapping filesystem."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

import counting_fs
from bucketsnap import Snapshot, SnapshotNotFoundError, SnapshotStore


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


def test_membership_keys_len_and_iteration_read_nothing() -> None:
    store = SnapshotStore("countmem://membership/run")
    store.save(1, {"policy": {"w": torch.randn(1000)}, "buffer": torch.randn(200_000)})
    snap = store.open()

    counting_fs.CountingMemoryFileSystem.reset_counts()
    assert "buffer" in snap and "policy" in snap and "absent" not in snap
    keys = snap.keys()
    assert "buffer" in keys and "absent" not in keys
    assert list(snap) == list(snap.keys()) == ["policy", "buffer"]
    assert len(snap) == len(snap.keys()) == 2 and snap
    assert snap.get("absent") is None and snap.get("absent", 5) == 5
    assert dict.fromkeys(snap) == {"policy": None, "buffer": None}
    assert counting_fs.CountingMemoryFileSystem.reads == 0, "membership and keys must be answered by the manifest"

    assert snap.get("policy")["w"].shape == (1000,)  # a present key is loaded
    assert counting_fs.CountingMemoryFileSystem.reads > 0


def test_a_missing_member_archive_or_ref_is_named() -> None:
    """A member held in another archive (a rank's, in a distributed save), or a ref, that is missing is named."""
    store = SnapshotStore("memory://missing-objects/run")
    own = store.save(1, {"policy": {"w": torch.ones(3)}})
    other = store.save(2, {"buffer": torch.zeros(5)})
    info = dataclasses.replace(
        own,
        members={**own.members, "buffer": dataclasses.replace(other.members["buffer"], path=other.path)},
        refs=("chunks/0123abcd.zst",),
    )
    snap = Snapshot(store.storage, info)
    store.storage.delete(other.path)
    with pytest.raises(SnapshotNotFoundError) as missing:
        snap["buffer"]
    assert store.storage.url_of(other.path) in str(missing.value)
    assert f"committed snapshot itr 1 ({own.url})" in str(missing.value)
    assert torch.equal(snap["policy"]["w"], torch.ones(3))
    with pytest.raises(SnapshotNotFoundError, match=re.escape(store.storage.url_of(other.path))):
        snap.verify()

    info = dataclasses.replace(info, members=own.members)  # now only the ref is missing
    with pytest.raises(SnapshotNotFoundError, match=re.escape(store.storage.url_of("chunks/0123abcd.zst"))):
        Snapshot(store.storage, info).verify()

    store.storage.delete(own.path)
    with pytest.raises(
        SnapshotNotFoundError, match=re.escape(f"the archive of committed snapshot itr 1 is missing: {own.url}")
    ):
        snap["policy"]
