"""Retention policies: pure functions over snapshot infos, applied by the store after each commit."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import pytest
import torch

from bucketsnap import KeepAny, KeepBest, KeepEvery, KeepLast, RetentionPolicy, SnapshotInfo, SnapshotStore
from bucketsnap.errors import StorageError
from bucketsnap.retention import garage_mode, split
from conftest import Backend


@pytest.fixture(params=["memory", "s3"])
def mem_or_s3(request: pytest.FixtureRequest) -> Backend:
    if request.param == "s3":
        request.applymarker(pytest.mark.s3)
    return request.getfixturevalue(f"{request.param}_backend")  # type: ignore[no-any-return]


def infos(*itrs: int, **metrics_by_itr: dict[str, object]) -> list[SnapshotInfo]:
    now = datetime.now(timezone.utc)
    return [
        SnapshotInfo(
            itr,
            f"snapshots/{itr}.zip",
            f"memory://r/snapshots/{itr}.zip",
            1,
            now,
            metrics=dict(metrics_by_itr.get(f"i{itr}", {})),
        )  # type: ignore[arg-type]
        for itr in itrs
    ]


def scored(values: dict[int, object], name: str = "return") -> list[SnapshotInfo]:
    return infos(*values, **{f"i{itr}": {name: v} for itr, v in values.items()})


def test_keep_last_is_by_itr_not_by_list_order() -> None:
    snaps = infos(0, 5, 1, 3)
    assert KeepLast(2).keep(snaps) == {3, 5}
    assert KeepLast(0).keep(snaps) == set()
    assert KeepLast(10).keep(snaps) == {0, 1, 3, 5}
    assert KeepLast(1).keep([]) == set()


def test_keep_last_keeps_every_snapshot_while_there_are_fewer_than_n() -> None:
    # was: itrs[len(itrs) - n:] with a negative start kept only the newest (or the last few) of them
    for n in range(1, 6):
        for count in range(n + 1):
            assert KeepLast(n).keep(infos(*range(count))) == set(range(count)), (n, count)
    assert KeepLast(3).keep(infos(4, 9)) == {4, 9}
    assert KeepLast(0).keep(infos(4, 9)) == set()


def test_keep_last_through_the_store_keeps_the_last_n(memory_backend: Backend) -> None:
    store = memory_backend.store(retention=KeepLast(3))
    seen = []
    for itr in range(1, 9):
        store.save(itr, {"step": itr})
        seen.append(store.itrs())
    assert seen == [[1], [1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5], [4, 5, 6], [5, 6, 7], [6, 7, 8]]  # was [.., [8]]
    union = memory_backend.store(retention=KeepEvery(5) | KeepLast(3))
    seen = []
    for itr in range(1, 9):
        union.save(itr, {"step": itr})
        seen.append(union.itrs())
    assert seen[2] == [1, 2, 3] and seen[5] == [4, 5, 6] and seen[7] == [5, 6, 7, 8]  # was [3] and [5, 6]


def test_keep_every_includes_itr_zero() -> None:
    assert KeepEvery(3).keep(infos(0, 1, 2, 3, 4, 5, 6, 7)) == {0, 3, 6}
    assert KeepEvery(1).keep(infos(0, 1, 2)) == {0, 1, 2}


def test_keep_best_max_and_min() -> None:
    snaps = scored({1: 5.0, 2: 9.0, 3: -1.0, 4: 7})
    assert KeepBest(2, "return").keep(snaps) == {2, 4}
    assert KeepBest(2, "return", mode="min").keep(snaps) == {1, 3}
    assert KeepBest(0, "return").keep(snaps) == set()


def test_keep_best_ties_go_to_the_newer_itr() -> None:
    snaps = scored({1: 7.0, 2: 3.0, 3: 7.0, 4: 7.0, 5: 1.0})
    assert KeepBest(1, "return").keep(snaps) == {4}
    assert KeepBest(2, "return").keep(snaps) == {3, 4}
    assert KeepBest(1, "return", mode="min").keep(scored({2: 1.0, 6: 1.0, 9: 2.0})) == {6}
    assert KeepBest(1, "return").keep(scored({3: 1, 8: 1.0})) == {8}  # int and float compare equal


def test_keep_best_compares_large_ints_exactly() -> None:
    # was: float(value) made 2**53 + 1 tie with 2**53 (the tie went to the newer, lower value) ...
    assert KeepBest(1, "n").keep(scored({1: 2**53 + 1, 2: 2**53}, "n")) == {1}
    assert KeepBest(1, "n", mode="min").keep(scored({1: 2**53, 2: 2**53 + 1}, "n")) == {1}
    # ... and raised OverflowError beyond 1e308
    assert KeepBest(1, "n").keep(scored({1: 10**400, 2: 1e308}, "n")) == {1}
    assert KeepBest(1, "n", mode="min").keep(scored({1: -(10**400), 2: -1e308}, "n")) == {1}


def test_keep_best_on_a_huge_int_metric_does_not_fail_a_committed_save(memory_backend: Backend) -> None:
    store = memory_backend.store(retention=KeepBest(1, "n"))
    store.save(1, {"step": 1}, metrics={"n": 10**400})
    store.save(2, {"step": 2}, metrics={"n": 1})  # was: OverflowError, raised after itr 2 was committed
    assert store.itrs() == [1, 2]
    store.save(3, {"step": 3}, metrics={"n": 10**400 - 1})
    assert store.itrs() == [1, 3]


def test_keep_best_ignores_missing_and_non_numeric_metrics() -> None:
    snaps = [*scored({1: 2.0}), *scored({2: "high", 3: True, 4: None}), *infos(5)]
    assert KeepBest(3, "return").keep(snaps) == {1}
    assert KeepBest(3, "other").keep(snaps) == set()


def test_union_keeps_what_any_policy_keeps_and_flattens() -> None:
    snaps = scored({0: 1.0, 1: 9.0, 2: 1.0, 3: 1.0, 4: 1.0, 5: 1.0})
    union = KeepEvery(4) | KeepLast(1) | KeepBest(1, "return")
    assert isinstance(union, KeepAny)
    assert union.policies == (KeepEvery(4), KeepLast(1), KeepBest(1, "return"))
    assert union.keep(snaps) == {0, 4, 5, 1}
    assert KeepAny(KeepLast(1), KeepAny(KeepEvery(2))) == KeepAny(KeepLast(1), KeepEvery(2))
    assert repr(KeepEvery(2) | KeepLast(1)) == "KeepEvery(k=2) | KeepLast(n=1)"
    assert KeepAny().keep(snaps) == set()


def test_policies_are_frozen_and_validated() -> None:
    with pytest.raises(AttributeError):
        KeepLast(1).n = 2  # type: ignore[misc]
    for bad in (lambda: KeepLast(-1), lambda: KeepLast(True), lambda: KeepEvery(0), lambda: KeepEvery(1.5)):
        with pytest.raises(ValueError, match="must be an int"):
            bad()
    with pytest.raises(ValueError, match="'max' or 'min'"):
        KeepBest(1, "return", mode="avg")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="metric name"):
        KeepBest(1, "")
    with pytest.raises(TypeError):
        KeepAny(KeepLast(1), "last")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="retention policy"):
        SnapshotStore("memory://r", retention="last")  # type: ignore[arg-type]


def test_split_always_keeps_the_newest() -> None:
    snaps = scored({1: 3.0, 2: 1.0})
    kept, dropped = split(KeepBest(1, "missing"), snaps)
    assert [s.itr for s in kept] == [2] and [s.itr for s in dropped] == [1]
    assert split(KeepLast(0), []) == ([], [])


def test_garage_modes_are_retention_policies() -> None:
    assert garage_mode("last", 5) == KeepLast(1)
    assert garage_mode("gap_and_last", 5) == KeepEvery(5) | KeepLast(1)
    assert all(garage_mode(m, 5) is None for m in ("all", "gap", "none"))
    with pytest.raises(ValueError, match="snapshot_mode"):
        garage_mode("best", 1)
    assert isinstance(KeepLast(1), RetentionPolicy)


def test_store_prunes_after_commit_and_gc_removes_the_objects(mem_or_s3: Backend) -> None:
    store = mem_or_s3.store(retention=KeepLast(2))
    saved = [store.save(itr, {"itr": itr}) for itr in range(5)]
    assert store.itrs() == [3, 4]
    # Pruning only rewrote the manifest: the dropped archives stay until gc, which readers rely on.
    assert len(store.storage.list("snapshots")) == 5
    assert [p for p in store.gc() if p.startswith("snapshots/")] == []  # younger than the default min_age
    removed = store.gc(min_age=0)
    assert sorted(p for p in removed if p.startswith("snapshots/")) == sorted(s.path for s in saved[:3])
    assert len(store.storage.list("snapshots")) == 2
    assert store.load("first") == {"itr": 3} and store.load() == {"itr": 4}


def test_a_reader_that_resolved_a_pruned_snapshot_finishes_its_read(mem_or_s3: Backend) -> None:
    store = mem_or_s3.store(retention=KeepLast(1))
    store.save(1, {"policy": {"w": torch.ones(100)}, "step": 1})
    reading = store.open("last")  # resolved, not yet read
    store.save(2, {"policy": {"w": torch.zeros(100)}, "step": 2})
    assert store.itrs() == [2]
    assert torch.equal(reading["policy"]["w"], torch.ones(100))
    assert reading.load(["step"]) == {"step": 1}


def test_keep_best_through_the_store_with_ties(mem_or_s3: Backend) -> None:
    store = mem_or_s3.store(retention=KeepBest(2, "return"))
    for itr, ret in enumerate([5.0, 9.0, 9.0, 1.0, 9.0, 2.0]):
        store.save(itr, {"itr": itr}, metrics={"return": ret})
    # best two: the newest of the three 9.0s (4) and the next newest (2); plus the newest snapshot (5)
    assert store.itrs() == [2, 4, 5]


def test_a_failed_prune_keeps_the_save_and_is_redone_by_the_next_commit(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store = SnapshotStore("memory://retention/failing", retention=KeepLast(1))
    store.save(0, {"v": 0})
    original = store._log.commit_state
    calls = []

    def failing_prune(change):  # type: ignore[no-untyped-def]
        calls.append(change)
        if len(calls) == 2:  # the prune after the second save's commit (the first call)
            raise StorageError("memory://retention/failing: throttled")
        return original(change)

    monkeypatch.setattr(store._log, "commit_state", failing_prune)
    with caplog.at_level(logging.WARNING, logger="bucketsnap"):
        info = store.save(1, {"v": 1})
    assert info.itr == 1 and "the next commit retries" in caplog.text
    assert store.itrs() == [0, 1]
    store.save(2, {"v": 2})
    assert store.itrs() == [2]


def test_a_subclass_of_keep_last_that_overrides_keep_is_applied_as_it_says() -> None:
    """A save decides KeepLast and KeepEvery from the itrs alone; a user's subclass overriding ``keep`` (the
    documented extension point) was bypassed that way, and the save dropped what its ``keep`` kept (found by
    review)."""

    class KeepLastAndBest(KeepLast):
        def keep(self, infos: Sequence[SnapshotInfo]) -> frozenset[int]:
            best = max(infos, key=lambda s: s.metrics.get("reward", 0))
            return super().keep(infos) | {best.itr}

    store = SnapshotStore("memory://retention-subclass/run", retention=KeepLastAndBest(2) | KeepEvery(100))
    for itr in range(6):
        store.save(itr, {"x": itr}, metrics={"reward": 100 if itr == 1 else itr})
    assert store.itrs() == [0, 1, 4, 5]


@pytest.mark.parametrize("policy", [KeepLast(2), KeepBest(2, "r")], ids=["itrs", "entries"])
def test_a_prune_decides_on_the_run_it_commits_to_not_on_the_one_the_save_saw(
    monkeypatch: pytest.MonkeyPatch, policy: RetentionPolicy
) -> None:
    """Another writer deletes a snapshot between the save's commit and its prune's: the prune keeps what the
    policy keeps of the run as it is then (a review found a prune that reused the drops it computed first would
    pass every test, and leave one snapshot where KeepLast(2) keeps two)."""
    url = "memory://retention/racing-delete"
    store = SnapshotStore(url, retention=policy)
    for itr in range(5):
        SnapshotStore(url).save(itr, {"v": itr}, metrics={"r": itr})
    original = store._log.commit_state
    calls: list[Any] = []

    def another_writer_deletes_first(change: Any) -> Any:
        calls.append(change)
        if len(calls) == 2:  # the prune, after the save's own commit
            SnapshotStore(url).delete(4)
        return original(change)

    monkeypatch.setattr(store._log, "commit_state", another_writer_deletes_first)
    store.save(5, {"v": 5}, metrics={"r": 5})
    assert store.itrs() == [3, 5]
