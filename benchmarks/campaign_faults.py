"""Fault-injection campaign: saves and loads through ``faulty://`` (tests/faulty_fs.py) on a seeded schedule.

After each save attempt the faults are switched off and the run is checked: the manifest reads, every committed
snapshot either loads as exactly the state saved for its itr or raises ``CorruptSnapshotError`` (allowed only
for snapshots whose upload was silently damaged), a new save succeeds, and nothing a save reported as committed
is missing. A load that returns different data without raising is a silent corruption.
"""

from __future__ import annotations

import random
import time
import uuid
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from benchmarks.campaign_common import PART_SIZE, check_state, state_for


@dataclass
class FaultFigures:
    backend: str
    faults: int = 0
    by_kind: Counter[str] = field(default_factory=Counter)
    saves_ok: int = 0
    saves_failed: int = 0
    save_errors: Counter[str] = field(default_factory=Counter)
    loads_ok: int = 0
    loads_failed: int = 0
    detected_by_checksum: int = 0
    silent_corruptions: int = 0
    unusable_after_failed_save: int = 0
    lost_commits: int = 0
    untyped_errors: int = 0
    seconds: float = 0.0


def run(
    *,
    saves: int,
    seed: int = 0,
    rate: float = 0.05,
    target_protocol: str = "memory",
    target_options: dict[str, Any] | None = None,
    bucket: str | None = None,
) -> FaultFigures:
    from bucketsnap import BucketsnapError, CorruptSnapshotError, SnapshotStore
    from faulty_fs import SILENT_DATA_FAULTS, FaultPlan

    rng = random.Random(seed)
    plan = FaultPlan(seed=seed, rate=rate)
    figures = FaultFigures(f"faulty+{target_protocol}")
    options = {"plan": plan, "target_protocol": target_protocol, "target_options": target_options or {}}
    url = f"faulty://{bucket or 'campaign'}/faults-{uuid.uuid4().hex[:8]}"
    warnings.filterwarnings("ignore", message=".*no known atomic exclusive create")
    store = SnapshotStore(url, storage_options=options, part_size=PART_SIZE)
    if hasattr(store.storage, "retry"):  # the retry policy of issue 5, with short sleeps: faults are simulated
        from bucketsnap._transport import Retry  # type: ignore[import-not-found,unused-ignore]

        store.storage.retry = Retry(attempts=store.storage.retry.attempts, initial=0.001, max_delay=0.004)
    reported: set[int] = set()
    checked: set[int] = set()
    start = time.monotonic()

    def damaged(path: str) -> bool:
        return any(kind in SILENT_DATA_FAULTS and p.endswith(path) for _, kind, p in plan.log)

    for itr in range(saves):
        plan.enabled = True
        floats = 400_000 if rng.random() < 0.2 else 5_000
        failed = False
        try:
            if rng.random() < 0.5:
                store.save(itr, state_for(itr, floats))
            else:
                store.save_async(itr, state_for(itr, floats)).result()
            figures.saves_ok += 1
            reported.add(itr)
        except BucketsnapError as exc:
            failed = True
            figures.saves_failed += 1
            figures.save_errors[type(exc).__name__] += 1
        except Exception as exc:  # a backend error that escaped translation
            failed = True
            figures.untyped_errors += 1
            figures.save_errors[type(exc).__name__] += 1
        # Loads under faults: an error is fine, different data is not.
        committed = _itrs(store, plan)
        for which in rng.sample(committed, min(2, len(committed))):
            try:
                problem = check_state(which, store.load(which))
                figures.loads_ok += problem is None
                figures.silent_corruptions += problem is not None
            except BucketsnapError:
                figures.loads_failed += 1
            except Exception:
                figures.untyped_errors += 1
        # With the faults off, the run must be usable.
        plan.enabled = False
        usable = True
        try:
            infos = {info.itr: info for info in store.infos()}
            figures.lost_commits += len(reported - set(infos))
            final = itr == saves - 1
            for which, info in infos.items():
                if which in checked and not final:
                    continue  # archives are immutable: a snapshot that checked out once stays so
                checked.add(which)
                try:
                    store.verify(which)
                    problem = check_state(which, store.load(which))
                    figures.silent_corruptions += problem is not None
                except BucketsnapError as exc:
                    if isinstance(exc, CorruptSnapshotError) and damaged(info.path):
                        figures.detected_by_checksum += 1
                    else:
                        print(f"  faults: itr {which} broken after save of itr {itr}: {exc!r}")
                        usable = False
                    store.delete(which)  # what a user does with a snapshot that fails its checksum
                    reported.discard(which)
        except BucketsnapError as exc:
            print(f"  faults: run unusable after itr {itr}: {exc!r}")
            usable = False
        if failed and not usable:
            figures.unusable_after_failed_save += 1
        if not usable:
            store.repair()  # so that the campaign can go on
    figures.by_kind = Counter(plan.injected)
    figures.faults = sum(plan.injected.values())
    figures.seconds = time.monotonic() - start
    return figures


def _itrs(store: Any, plan: Any) -> list[int]:
    enabled, plan.enabled = plan.enabled, False
    try:
        return list(store.itrs())
    finally:
        plan.enabled = enabled
