"""Model-based test of the commit log and gc: random interleavings of saves (split into their write and commit
steps), deletes, retention, gc passes on clocks that jump around, repairs of the healthy run, checked after every
step.

The reference is plain: a save whose commit returns is listed with exactly its data; a save that fails was
refused only after a gc pass ran during it; every object that any committed snapshot needs exists; when every
save has ended, gc with ``min_age=0`` leaves exactly the objects committed snapshots need.
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from bucketsnap import SnapshotStore, StorageError
from bucketsnap._chunks import ChunkedArrays, ChunkTable, read_chunks
from bucketsnap._maintenance import DATA_DIRS, collect_garbage
from bucketsnap._saving import prepare
from bucketsnap.retention import KeepLast

ROWS = 8
#: Few distinct rows, so that saves share chunks with each other and with orphans of earlier saves.
PATTERNS = [np.full((ROWS, 4), k, dtype=np.uint8) for k in range(3)]


def _state(itr: int, pattern: int) -> dict[str, Any]:
    buffer = ChunkedArrays({"obs": PATTERNS[pattern]}, ROWS, kind="test", chunk_rows=2)
    return {"buf": buffer, "step": itr}


class CommitLogAndGc(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.store = SnapshotStore(f"memory://gc-model/{uuid.uuid4().hex}")
        self.next_itr = 1
        self.clock = 1_000_000.0
        self.in_flight: dict[int, tuple[Any, int, int]] = {}  # itr -> (staged save, pattern, gc passes seen)
        self.committed: dict[int, int] = {}  # itr -> pattern, the reference
        self.gc_passes = 0
        self.paused_deletes: list[str] = []  # a gc that committed its sweep and froze before deleting

    # -- saves, in two steps ------------------------------------------------------------------------------

    @rule(pattern=st.integers(0, len(PATTERNS) - 1))
    def begin_save(self, pattern: int) -> None:
        itr = self.next_itr
        self.next_itr += 1
        prepared = prepare(itr, _state(itr, pattern), None, overwrite=False, copy=False)
        self.in_flight[itr] = (self.store._stage(prepared), pattern, self.gc_passes)

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data())
    def commit_save(self, data: st.DataObject) -> None:
        itr = data.draw(st.sampled_from(sorted(self.in_flight)))
        staged, pattern, passes_before = self.in_flight.pop(itr)
        try:
            self.store._commit_new(staged.info, staged.base, overwrite=False, written=[staged.info.path])
        except StorageError as exc:
            assert self.gc_passes > passes_before, f"refused although no gc ran during the save: {exc}"
            assert "gc deleted or may have deleted" in str(exc)
            return
        self.committed[itr] = pattern

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data())
    def crash_save(self, data: st.DataObject) -> None:
        """A writer killed between its write and its commit: its objects are orphans."""
        self.in_flight.pop(data.draw(st.sampled_from(sorted(self.in_flight))))

    # -- other writers -------------------------------------------------------------------------------------

    @precondition(lambda self: self.committed)
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        itr = data.draw(st.sampled_from(sorted(self.committed)))
        self.store.delete(itr)
        del self.committed[itr]

    @precondition(lambda self: len(self.committed) > 1)
    @rule()
    def retention_keeps_last(self) -> None:
        self.store.retention = KeepLast(1)
        self.store._apply_retention(self.store._log.read())
        self.store.retention = None
        newest = max(self.committed)
        self.committed = {newest: self.committed[newest]}

    @rule()
    def repair(self) -> None:
        """repair on a healthy run changes nothing visible: the orphans of crashed and in-flight saves, and what
        retention and deletes dropped, stay invisible; the saves in flight still land or fail their fence."""
        generations = self.store._log.generations()
        self.store.repair()
        assert self.store._log.generations() == generations, "repair committed on a healthy run"

    # -- gc, on clocks that disagree -----------------------------------------------------------------------

    @rule(
        min_age=st.sampled_from([0.0, 60.0, 3600.0]),
        skew=st.sampled_from([-7200.0, 0.0, 30.0, 7200.0]),
    )
    def gc(self, min_age: float, skew: float) -> None:
        self.clock += 10.0
        collect_garbage(self.store._log, min_age=min_age, dry_run=False, now=self.clock + skew)
        self.gc_passes += 1

    @precondition(lambda self: not self.paused_deletes)
    @rule(min_age=st.sampled_from([0.0, 3600.0]))
    def gc_freezes_before_deleting(self, min_age: float) -> None:
        """A gc process stopped (SIGSTOP) after committing its sweep, before its deletes: they land later."""
        storage = self.store.storage
        self.clock += 10.0
        real_delete = storage.delete
        storage.delete = self.paused_deletes.append  # type: ignore[method-assign]
        try:
            collect_garbage(self.store._log, min_age=min_age, dry_run=False, now=self.clock)
        finally:
            storage.delete = real_delete  # type: ignore[method-assign]
        self.gc_passes += 1

    @precondition(lambda self: self.paused_deletes)
    @rule()
    def frozen_gc_resumes(self) -> None:
        for rel in self.paused_deletes:
            self.store.storage.delete(rel)
        self.paused_deletes.clear()

    @rule(seconds=st.sampled_from([1.0, 600.0, 4000.0]))
    def time_passes(self, seconds: float) -> None:
        self.clock += seconds

    # -- what must hold ------------------------------------------------------------------------------------

    @invariant()
    def committed_snapshots_are_exactly_the_reference_and_complete(self) -> None:
        storage = self.store.storage
        infos = self.store.infos()
        assert [i.itr for i in infos] == sorted(self.committed)
        for info in infos:
            for rel in info.objects():
                assert storage.exists(rel), f"itr {info.itr} needs {rel}, which is gone"

    def teardown(self) -> None:
        # Every snapshot committed by the end restores exactly; then nothing is leaked.
        for itr, pattern in self.committed.items():
            self.store.verify(itr)
            snap = self.store.open(itr)
            assert snap["step"] == itr
            table = ChunkTable.parse(snap["buf"], snap.info.url)
            chunks = read_chunks(self.store.storage, table, where=snap.info.url, verify=True)
            restored = np.concatenate([rows["obs"] for _, rows in chunks])
            assert np.array_equal(restored, PATTERNS[pattern])
        self.in_flight.clear()
        self.frozen_gc_resumes()
        collect_garbage(self.store._log, min_age=0, dry_run=False, now=self.clock)
        stored = {f"{d}/{n}" for d in DATA_DIRS for n in self.store.storage.list(d)}
        assert stored == self.store._log.read().referenced()


CommitLogAndGc.TestCase.settings = settings(
    max_examples=300, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_commit_log_and_gc = CommitLogAndGc.TestCase
