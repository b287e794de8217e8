"""Model-based test of the paged commit log (manifest version 3), with pages of two entries so that tails seal,
inline levels seal, and pages are rewritten, split and emptied at almost every step.

Random saves (new itrs, overwrites, itrs inside sealed pages), deletes, retention, gc (``min_age=0``, and the
default on an injected clock), commits that die after writing their pages, repair (over a healthy run, which it
must leave as it is, and over a corrupt newest generation) and fresh reopens, checked after every step against a
plain dict of committed itrs and the value each was saved with: the listing, every lookup (``first``, ``last``, each
itr, absent itrs), the tree's own order, and every object and page the newest generation needs existing.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import bucketsnap._pages as pages_module
from bucketsnap import CorruptSnapshotError, SnapshotNotFoundError, SnapshotStore, StorageError
from bucketsnap._maintenance import DATA_DIRS, collect_garbage
from bucketsnap._manifest import generation_name
from bucketsnap._pages import PAGE_DIR, PageRef
from bucketsnap._saving import prepare
from bucketsnap.retention import KeepEvery, KeepLast

ITRS = st.integers(0, 40)


class PagedLog(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.saved_limits = (pages_module.TAIL, pages_module.FANOUT)
        pages_module.TAIL, pages_module.FANOUT = 2, 2
        self.url = f"memory://paged-model/{uuid.uuid4().hex}"
        self.store = SnapshotStore(self.url)
        self.committed: dict[int, int] = {}  # itr -> value: the reference
        self.ever: dict[int, set[int]] = {}  # itr -> every value committed for it (what repair may bring back)
        self.counter = 0
        self.clock = 1_000_000.0

    def _save(self, itr: int, *, overwrite: bool) -> None:
        self.counter += 1
        value = self.counter
        if itr in self.committed and not overwrite:
            with pytest.raises(FileExistsError):
                self.store.save(itr, {"v": value}, metrics={"v": value})
            return
        self.store.save(itr, {"v": value}, metrics={"v": value}, overwrite=overwrite)
        self.committed[itr] = value
        self.ever.setdefault(itr, set()).add(value)

    @rule(itr=ITRS, overwrite=st.booleans())
    def save(self, itr: int, overwrite: bool) -> None:
        self._save(itr, overwrite=overwrite)

    @rule()
    def append(self) -> None:
        self._save(max(self.committed, default=-1) + 1, overwrite=False)

    @rule(n=st.integers(4, 16))
    def append_many(self, n: int) -> None:
        """Enough new itrs for several level-3 pages, which deletes and retention then thin out."""
        for _ in range(n):
            self.append()

    @precondition(lambda self: self.committed)
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        itr = data.draw(st.sampled_from(sorted(self.committed)))
        self.store.delete(itr)
        del self.committed[itr]

    @rule(itr=ITRS)
    def delete_absent(self, itr: int) -> None:
        if itr not in self.committed:
            with pytest.raises(SnapshotNotFoundError):
                self.store.delete(itr)

    @precondition(lambda self: len(self.committed) > 1)
    @rule(policy=st.sampled_from([KeepLast(3), KeepEvery(3)]))
    def retention(self, policy: Any) -> None:
        before = sorted(self.committed)
        self.store.retention = policy
        self.store._apply_retention(self.store._log.read())
        self.store.retention = None
        if isinstance(policy, KeepLast):
            kept = before[-policy.n :]
        else:
            kept = sorted({i for i in before if i % policy.k == 0} | {before[-1]})  # the last always stays
        self.committed = {i: self.committed[i] for i in kept}

    @rule(itr=ITRS)
    def commit_dies_after_its_pages(self, itr: int) -> None:
        """A writer killed between writing its pages and creating its generation: the pages are orphans."""
        storage = self.store.storage
        real = storage.create_exclusive

        def die(rel: str, data: bytes) -> None:
            if not rel.startswith(f"{PAGE_DIR}/"):
                raise KeyboardInterrupt("killed")
            real(rel, data)

        storage.create_exclusive = die  # type: ignore[method-assign]
        self.counter += 1
        self.ever.setdefault(itr, set()).add(-self.counter)  # intact: a repair over corruption may commit it
        try:
            with pytest.raises(KeyboardInterrupt):
                self.store.save(itr, {"v": -self.counter}, metrics={"v": -self.counter}, overwrite=True)
        finally:
            storage.create_exclusive = real  # type: ignore[method-assign]

    @rule(itr=ITRS, other=ITRS, gc_between=st.booleans())
    def two_writers(self, itr: int, other: int, gc_between: bool) -> None:
        """A save staged (archive written) on one store, then another process's save of another itr (its own page
        cache), and possibly a gc with min_age=0, before the first commits: both land, or the fence refuses."""
        if itr == other:
            return
        self.counter += 1
        first = self.counter
        prepared = prepare(itr, {"v": first}, {"v": first}, overwrite=True, copy=False)
        staged = self.store._stage(prepared)
        self.ever.setdefault(itr, set()).add(first)
        self._save_on(SnapshotStore(self.url), other)
        if gc_between:
            self.clock += 10.0
            collect_garbage(self.store._log, min_age=0, dry_run=False, now=self.clock)
        try:
            self.store._commit_new(staged.info, staged.base, overwrite=True, written=[staged.info.path])
        except StorageError as exc:
            assert gc_between and "gc deleted or may have deleted" in str(exc)
            return
        self.committed[itr] = first

    def _save_on(self, store: SnapshotStore, itr: int) -> None:
        self.counter += 1
        store.save(itr, {"v": self.counter}, metrics={"v": self.counter}, overwrite=True)
        self.committed[itr] = self.counter
        self.ever.setdefault(itr, set()).add(self.counter)

    @rule(min_age=st.sampled_from([0.0, 3600.0]), later=st.sampled_from([0.0, 4000.0]))
    def gc(self, min_age: float, later: float) -> None:
        self.clock += 10.0 + later
        collect_garbage(self.store._log, min_age=min_age, dry_run=False, now=self.clock)

    @rule()
    def repair(self) -> None:
        """On a healthy run (here every step leaves one) repair changes nothing visible and commits nothing: what
        retention dropped, what was deleted, and the archives of commits that died stay invisible."""
        log = self.store._log
        generations, before = log.generations(), [(i.itr, i.path, i.metrics) for i in self.store.infos()]
        self.store.repair()
        assert log.generations() == generations, "repair committed on a healthy run"
        assert [(i.itr, i.path, i.metrics) for i in SnapshotStore(self.url).infos()] == before

    @precondition(lambda self: self.store._log.generations())
    @rule()
    def repair_a_corrupt_generation(self) -> None:
        log = self.store._log
        generations = log.generations()
        storage = self.store.storage
        storage.fs.pipe_file(storage.path(generation_name(generations[-1])), b'{"format": "bucketsnap-manifest", "vers')
        # Repair starts from the newest generation that parses: what only the lost ones committed, it can tell
        # from no other intact archive of the same itr (a killed commit's, say), and may bring back as either.
        base: dict[int, int] = {}
        for generation in reversed(generations[:-1]):
            try:
                base = {i.itr: i.metrics["v"] for i in log.read_generation(generation).snapshots}
                break
            except CorruptSnapshotError:
                continue
        self.store.repair()
        self._adopt_recovered(kept={i: v for i, v in self.committed.items() if base.get(i) == v})

    def _adopt_recovered(self, kept: dict[int, int]) -> None:
        """Repair over a corrupt generation keeps every snapshot of ``kept`` and may add intact archives it finds
        (of values once saved)."""
        found = {info.itr: info.metrics["v"] for info in self.store.infos()}
        for itr, value in kept.items():
            assert found.get(itr) == value, f"repair lost or changed itr {itr}"
        for itr, value in found.items():
            assert value in self.ever.get(itr, set()), f"repair brought back itr {itr} with a value never saved"
        self.committed = found

    @rule()
    def reopen(self) -> None:
        self.store = SnapshotStore(self.url)

    # -- what must hold ------------------------------------------------------------------------------------

    @invariant()
    def the_log_is_the_reference(self) -> None:
        fresh = SnapshotStore(self.url)  # its own page cache: everything is read from the store
        assert fresh.itrs() == sorted(self.committed)
        assert {i.itr: i.metrics["v"] for i in fresh.infos()} == self.committed
        if self.committed:
            assert fresh.info("first").itr == min(self.committed)
            assert fresh.info("last").itr == max(self.committed)
        for itr in range(0, 42):
            if itr in self.committed:
                assert fresh.info(itr).metrics["v"] == self.committed[itr]
            else:
                with pytest.raises(SnapshotNotFoundError):
                    fresh.info(itr)
        newest = fresh._log.read()
        _check_tree(newest.tree)
        storage = fresh.storage
        for rel in newest.referenced() | newest.tree.page_paths():
            assert storage.exists(rel), f"the newest generation needs {rel}, which is gone"

    def teardown(self) -> None:
        try:
            for itr, value in self.committed.items():
                assert self.store.load(itr)["v"] == value
            collect_garbage(self.store._log, min_age=0, dry_run=False, now=self.clock)
            log = self.store._log
            stored = {f"{d}/{n}" for d in DATA_DIRS for n in self.store.storage.list(d)}
            assert stored == log.read().referenced()
            live: set[str] = set()
            readable = True  # no corrupt generation is left
            for generation in log.generations():
                try:
                    live |= log.read_generation(generation).tree.page_paths()
                except CorruptSnapshotError:  # its pages are unknown: gc keeps every page while it is there
                    readable = False
            # Every page a generation present references is kept. (Pages of generations that gc's own commits
            # pruned were still live when it looked: the next gc removes them.)
            stored_pages = {f"{PAGE_DIR}/{n}" for n in self.store.storage.list(PAGE_DIR)}
            assert stored_pages >= live
            if readable:
                orphans = stored_pages - live
                collect_garbage(self.store._log, min_age=0, dry_run=False, now=self.clock)
                assert not orphans & {f"{PAGE_DIR}/{n}" for n in self.store.storage.list(PAGE_DIR)}
        finally:
            pages_module.TAIL, pages_module.FANOUT = self.saved_limits


def _check_tree(tree: Any) -> None:
    """Levels ascend, each reference says exactly what its page holds, and no page is over twice its size."""
    items = [*(r for refs in reversed(tree.levels) for r in refs), *tree.tail]
    seen: list[int] = []

    def walk(item: Any) -> None:
        if not isinstance(item, PageRef):
            seen.append(item.itr)
            return
        children = tree._load(item)
        assert len(children) <= 2 * (pages_module.TAIL if item.level == 1 else pages_module.FANOUT)
        start = len(seen)
        for child in children:
            walk(child)
        assert (seen[start], seen[-1], len(seen) - start) == (item.first, item.last, item.count)

    for item in items:
        walk(item)
    assert seen == sorted(set(seen)) and tree.count == len(seen)
    assert len(tree.tail) < pages_module.TAIL and all(len(r) < pages_module.FANOUT for r in tree.levels[:-1])
    # Sparse pages are merged: at each inline level, at most one page holds half a page or less, so the inline
    # references are bounded by the entries the run holds, not by the itrs it ever saved.
    for k, refs in enumerate(tree.levels):
        half = (pages_module.TAIL if k == 0 else pages_module.FANOUT) // 2
        sparse = [r.path for r in refs if len(tree._load(r)) <= half]
        assert len(sparse) <= 1, f"level-{k + 1} references to sparse pages: {sparse}"


PagedLog.TestCase.settings = settings(
    max_examples=15,
    stateful_step_count=25,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],  # no shrinking: a failure prints its steps as found
    suppress_health_check=[HealthCheck.too_slow],
)
test_paged_commit_log = PagedLog.TestCase
