"""A model-based test of retention: random saves, deletes and overwrites through a real store, each step checked
against a reference written from docs/retention.md, not from bucketsnap's policy code.

The reference, sentence by sentence:

- ``KeepLast(n)``: "the ``n`` highest itrs"; ``KeepEvery(k)``: "itrs that are multiples of ``k``, itr 0 included";
- ``KeepBest(n, metric, mode)``: "the ``n`` snapshots with the best value of ``metric``"; "ties ... go to the newer
  snapshot (the higher itr)"; "snapshots without the metric, or whose value is not a number, are not candidates";
- ``a | b``: "what any of them keeps"; "the newest snapshot is always kept";
- "the store applies the policy after each commit" of a save; a delete removes just the itr it names;
- repair on a healthy run "adds nothing and commits nothing" (docs/protocol.md).
"""

from __future__ import annotations

import functools
import operator
import uuid
from typing import Any

import fsspec
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from bucketsnap import KeepBest, KeepEvery, KeepLast, RetentionPolicy, SnapshotExistsError, SnapshotStore

Spec = tuple[Any, ...]  # ("last", n) | ("every", k) | ("best", n, metric, mode)
Metrics = dict[str, Any]

METRIC_NAMES = ("ret", "loss")
# few values, so ties are common; bool, str and None are not numbers, 2**53 + 1 is not 2**53, and 10**400 is no float
METRIC_VALUES = st.one_of(
    st.sampled_from([0, 1, 2, 2.0, 3.5, -1, 2**53, 2**53 + 1, 10**400]), st.sampled_from([True, False, "high", None])
)
METRICS = st.dictionaries(st.sampled_from(METRIC_NAMES), METRIC_VALUES, max_size=2)
SPECS = st.one_of(
    st.tuples(st.just("last"), st.integers(0, 4)),
    st.tuples(st.just("every"), st.integers(1, 4)),
    st.tuples(st.just("best"), st.integers(0, 3), st.sampled_from(METRIC_NAMES), st.sampled_from(["max", "min"])),
)


def policy_of(specs: list[Spec]) -> RetentionPolicy:
    def one(spec: Spec) -> RetentionPolicy:
        if spec[0] == "last":
            return KeepLast(spec[1])
        if spec[0] == "every":
            return KeepEvery(spec[1])
        return KeepBest(spec[1], spec[2], mode=spec[3])

    return functools.reduce(operator.or_, map(one, specs))


def is_number(value: object) -> bool:
    return type(value) in (int, float)  # bool is an int subclass, and not a number here


def reference_keep(spec: Spec, committed: dict[int, Metrics]) -> set[int]:
    if spec[0] == "last":
        return set(sorted(committed, reverse=True)[: spec[1]])
    if spec[0] == "every":
        return {itr for itr in committed if itr % spec[1] == 0}
    _, n, metric, mode = spec
    candidates = [itr for itr, m in committed.items() if is_number(m.get(metric))]
    kept: set[int] = set()
    for _ in range(min(n, len(candidates))):  # pick the best one left, n times
        rest = [itr for itr in candidates if itr not in kept]
        values = [committed[itr][metric] for itr in rest]
        best = max(values) if mode == "max" else min(values)
        kept.add(max(itr for itr in rest if committed[itr][metric] == best))  # a tie: the newer
    return kept


def reference_retain(specs: list[Spec], committed: dict[int, Metrics]) -> dict[int, Metrics]:
    if not committed:
        return committed
    keep = {max(committed)}.union(*(reference_keep(spec, committed) for spec in specs))
    return {itr: m for itr, m in committed.items() if itr in keep}


class RetentionModel(RuleBasedStateMachine):
    """The store under a random policy, and the reference: which itrs are committed, with which metrics."""

    def __init__(self) -> None:
        super().__init__()
        self.committed: dict[int, Metrics] = {}
        self.saves = 0
        self.saved_as: dict[int, int] = {}  # itr -> which save wrote it: tells the overwrites of one itr apart

    @initialize(specs=st.lists(SPECS, min_size=1, max_size=3))
    def open_store(self, specs: list[Spec]) -> None:
        self.specs = specs
        # the autouse fixture clears the memory store between tests, not between hypothesis examples
        self.url = f"memory://retention-model/{uuid.uuid4().hex}"
        self.store = SnapshotStore(self.url, retention=policy_of(specs))

    def _save(self, itr: int, metrics: Metrics, *, overwrite: bool = False) -> None:
        self.saves += 1
        info = self.store.save(itr, {"step": itr, "save": self.saves}, metrics=metrics, overwrite=overwrite)
        assert (info.itr, info.metrics) == (itr, metrics)
        self.committed[itr] = dict(metrics)
        self.committed = reference_retain(self.specs, self.committed)
        self.saved_as[itr] = self.saves

    @rule(gap=st.integers(1, 3), metrics=METRICS)
    def save_newer(self, gap: int, metrics: Metrics) -> None:
        self._save(max(self.committed, default=-1) + gap, metrics)

    @precondition(lambda self: any(itr not in self.committed for itr in range(max(self.committed, default=0))))
    @rule(data=st.data(), metrics=METRICS)
    def save_out_of_order(self, data: st.DataObject, metrics: Metrics) -> None:
        older = [itr for itr in range(max(self.committed)) if itr not in self.committed]
        self._save(data.draw(st.sampled_from(older), label="itr"), metrics)

    @precondition(lambda self: bool(self.committed))
    @rule(data=st.data(), metrics=METRICS, same_metrics=st.booleans())
    def overwrite(self, data: st.DataObject, metrics: Metrics, same_metrics: bool) -> None:
        itr = data.draw(st.sampled_from(sorted(self.committed)), label="itr")
        self._save(itr, dict(self.committed[itr]) if same_metrics else metrics, overwrite=True)

    @precondition(lambda self: bool(self.committed))
    @rule(data=st.data())
    def save_existing_is_refused(self, data: st.DataObject) -> None:
        itr = data.draw(st.sampled_from(sorted(self.committed)), label="itr")
        with pytest.raises(SnapshotExistsError):
            self.store.save(itr, {"step": itr})

    @precondition(lambda self: bool(self.committed))
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        itr = data.draw(st.sampled_from(sorted(self.committed)), label="itr")
        self.store.delete(itr)
        del self.committed[itr]

    @precondition(lambda self: hasattr(self, "store"))
    @rule()
    def repair(self) -> None:
        """repair on a healthy run changes nothing visible: what retention dropped (its archive left to gc) and
        what was deleted stay dropped (docs/protocol.md, repair)."""
        generations = self.store._log.generations()
        self.store.repair()
        assert self.store._log.generations() == generations, "repair committed on a healthy run"

    def teardown(self) -> None:
        # and drop this example's objects: the memory store is one dict that fsspec lists by scanning it all
        memory = fsspec.filesystem("memory")
        if hasattr(self, "url") and memory.exists(self.url):
            memory.rm(self.url, recursive=True)

    @invariant()
    def store_matches_the_reference(self) -> None:
        if not hasattr(self, "store"):
            return
        infos = self.store.infos()
        assert [s.itr for s in infos] == sorted(self.committed), self.specs
        assert {s.itr: s.metrics for s in infos} == self.committed, self.specs

    @precondition(lambda self: bool(self.committed))
    @rule()
    def last_loads_the_newest_save(self) -> None:
        newest = max(self.committed)
        assert self.store.load("last") == {"step": newest, "save": self.saved_as[newest]}


RetentionModel.TestCase.settings = settings(
    max_examples=80, stateful_step_count=20, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_retention_model = RetentionModel.TestCase
