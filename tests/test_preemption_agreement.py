"""Preemption across ranks: a signal that reaches one rank after that step's agreement waits for the next one.

``agree_on_preemption`` reads whether this rank was signalled, then all-reduces it. A signal that lands after
the read (during the all-reduce, or between two ``hold()`` blocks) used to make that rank start its final,
collective save alone while the others went on to the next step's collectives: both sides then waited for the
group's timeout (seen once in CI as a 30 s gloo all_reduce timeout on rank 0). The signalled rank now waits for
the next agreement, and every rank saves at the same step.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from bucketsnap import SnapshotStore
from conftest import Backend
from test_distributed import assert_no_leftovers, check_snapshot, run_ranks


@pytest.mark.parametrize("where", ["after_agree", "between_steps"])
def test_a_signal_after_the_agreement_is_handled_at_the_next_one(
    where: str, local_backend: Backend, tmp_path: Path
) -> None:
    url = local_backend.url(f"preempt-{where}")
    ranks = run_ranks(f"preempt_{where}", 2, local_backend, url, tmp_path)
    assert [r.returncode for r in ranks] == [-signal.SIGTERM, -signal.SIGTERM], [r.stderr[-2000:] for r in ranks]
    steps = [max(e["itr"] for e in r.events if e["event"] == "step") for r in ranks]
    store = SnapshotStore(url)
    assert store.itrs() == [0, 6] and steps == [6, 6], (store.itrs(), steps)
    check_snapshot(store, 6, 2)
    assert_no_leftovers(store)
