"""Maintenance of a run: garbage collection and repair. Neither ever removes or rewrites a committed snapshot.

**gc** removes objects that no committed snapshot needs, in two steps ordered against commits through the
manifest log rather than by clocks:

1. *condemn*: commit a generation that records, with the time on gc's clock, every object under
   ``snapshots/`` and ``chunks/`` that no snapshot of the newest generation needs (orphans of crashed saves,
   snapshots dropped by retention, and the objects of saves still being written);
2. *sweep*: commit a generation that moves the objects condemned at least ``min_age`` seconds ago, and still
   needed by no snapshot, into a numbered sweep, then delete them.

A save that commits after its objects were condemned but before a sweep simply makes them needed again (a
commit un-condemns what it references). A save whose objects a sweep committed to delete finds that sweep in
the generation it commits on (:func:`~bucketsnap.manifest.swept`) and fails with ``StorageError`` instead of
committing a reference to a deleted object: a writer that is paused for hours, that reuses a chunk another
snapshot dropped, or whose clock disagrees with gc's, can fail a save, but never commit a broken one.
``min_age`` only decides how soon space comes back: it gives readers that resolved a dropped snapshot, and
saves in flight, that long to finish (measured on gc's clocks, so a gc host whose clock runs ahead shortens it).
With ``min_age=0`` one call condemns and deletes every unreferenced object, failing any save in flight.

**repair** commits a new generation after a corrupt one: the newest generation that parses, plus every intact
archive it does not list, read from the archive's own ``meta.json``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace

from bucketsnap.archive import META_NAME
from bucketsnap.chunks import CHUNK_DIR
from bucketsnap.errors import BucketsnapError, CorruptSnapshotError, NotASnapshotError
from bucketsnap.info import SnapshotInfo
from bucketsnap.manifest import (
    KEEP_GENERATIONS,
    MANIFEST_DIR,
    SNAPSHOT_DIR,
    SWEEP_HISTORY,
    Manifest,
    ManifestLog,
    Sweep,
    generation_name,
)
from bucketsnap.snapshot import Snapshot
from bucketsnap.zipformat import crc32, data_offset, read_directory

__all__ = ["DATA_DIRS", "collect_garbage", "repair"]

logger = logging.getLogger("bucketsnap")

#: Directories of data objects that gc sweeps: archives, and content-addressed chunks shared by snapshots.
DATA_DIRS = (SNAPSHOT_DIR, CHUNK_DIR)


def collect_garbage(log: ManifestLog, *, min_age: float, dry_run: bool, now: float | None = None) -> list[str]:
    """Condemn what no committed snapshot needs, delete what stayed condemned for ``min_age`` seconds (unless
    ``dry_run``); return the paths deleted (or, with ``dry_run``, that would be), relative to the run."""
    storage = log.storage
    now = time.time() if now is None else now
    newest = log.read()
    stored = {f"{d}/{name}" for d in DATA_DIRS for name in storage.list(d)}
    unreferenced = stored - newest.referenced()
    if dry_run:
        doomed = {rel for rel in unreferenced if _ripe(newest.condemned.get(rel, now), now, min_age)}
        return sorted(doomed) + _stale_log_files(log, newest, now, min_age)

    if unreferenced - set(newest.condemned):

        def condemn(current: Manifest) -> Manifest:
            still = unreferenced - current.referenced()
            return replace(current, condemned={**{rel: now for rel in still}, **current.condemned})

        newest = log.commit_state(condemn)
    deleted: list[str] = []
    if any(_ripe(t, now, min_age) for t in newest.condemned.values()):
        sweep: list[Sweep] = []

        def sweep_ripe(current: Manifest) -> Manifest:
            needed = current.referenced()
            ripe = {rel for rel, t in current.condemned.items() if _ripe(t, now, min_age) and rel not in needed}
            sweep[:] = [Sweep(current.sweep + 1, frozenset(ripe))]
            return replace(
                current,
                condemned={rel: t for rel, t in current.condemned.items() if rel not in ripe},
                sweep=sweep[0].epoch,
                sweeps=(*current.sweeps, sweep[0])[-SWEEP_HISTORY:],
            )

        newest = log.commit_state(sweep_ripe)
        for rel in sorted(sweep[0].deleting):  # committed: no save can reference these any more
            storage.delete(rel)
            deleted.append(rel)
    for rel in _stale_log_files(log, newest, now, min_age):
        storage.delete(rel)
        deleted.append(rel)
    return deleted


def _ripe(condemned_at: float, now: float, min_age: float) -> bool:
    return min_age <= 0 or now - condemned_at >= min_age


def _stale_log_files(log: ManifestLog, newest: Manifest, now: float, min_age: float) -> list[str]:
    """Generations more than KEEP_GENERATIONS behind the newest, and temp files of interrupted local commits.

    Deleting a temp file of a commit still in progress only makes that commit fail (its link finds no file).
    """
    storage = log.storage
    stale = [generation_name(g) for g in log.generations() if g < newest.generation - KEEP_GENERATIONS]
    for name in storage.list(MANIFEST_DIR):
        rel = f"{MANIFEST_DIR}/{name}"
        if ".tmp-" in name and _ripe(storage.modified(rel) or now, now, min_age):
            stale.append(rel)
    return stale


def repair(log: ManifestLog) -> Manifest:
    """Commit a generation rebuilt from the newest one that parses plus the intact archives it lacks."""
    storage = log.storage
    base = Manifest(0)
    for generation in reversed(log.generations()):
        try:
            base = log.read_generation(generation)
            break
        except (CorruptSnapshotError, FileNotFoundError) as exc:
            logger.warning("skipping manifest generation %d: %s", generation, exc)
    known = {s.itr: s for s in base.snapshots}
    # Condemned archives and those a sweep is deleting are garbage, not snapshots to recover.
    skip = base.referenced() | set(base.condemned) | {rel for sweep in base.sweeps for rel in sweep.deleting}
    for name in storage.list(SNAPSHOT_DIR):
        rel = f"{SNAPSHOT_DIR}/{name}"
        if not name.endswith(".zip") or name.startswith(".") or rel in skip:
            continue
        try:
            info = _recover_info(log, rel)
        except (BucketsnapError, FileNotFoundError) as exc:
            logger.warning("not recovering %s: %s", storage.url_of(rel), exc)
            continue
        if info.itr not in known or info.created > known[info.itr].created:
            known[info.itr] = info

    def merged(current: Manifest) -> Manifest:
        # Commits made since (by another writer, or another repair) win over what was recovered.
        snapshots = {**known, **{s.itr: s for s in current.snapshots}}.values()
        if current.written is not None or current.generation == 0:  # parsed: its gc record is intact
            return current.with_snapshots(snapshots)
        # Rebuilt over a corrupt generation, whose gc record is lost: keep the last one known, and number the
        # sweeps past any that may have been lost with it, so that a save in flight cannot mistake a later
        # sweep for one it has seen (it fails instead, see manifest.swept).
        return replace(base, sweep=base.sweep + SWEEP_HISTORY + 1, sweeps=()).with_snapshots(snapshots)

    return log.commit_state(merged, over_corrupt=True)


def _recover_info(log: ManifestLog, rel: str) -> SnapshotInfo:
    """A snapshot's info read back from its archive's ``meta.json``, verified."""
    storage = log.storage
    size = storage.size(rel)
    where = storage.url_of(rel)

    def read_range(start: int, end: int) -> bytes:
        return storage.read(rel, start, end)

    entries = read_directory(read_range, size, where=where)
    if META_NAME not in entries:
        raise CorruptSnapshotError(f"{where} has no {META_NAME}")
    entry = entries[META_NAME]
    start = data_offset(read_range, entry, size, where=where)
    raw = read_range(start, start + entry.stored_size)
    if entry.method != 0:
        raise CorruptSnapshotError(f"{where}: {META_NAME} is compressed (zip method {entry.method}), not stored")
    if crc32(raw) != entry.crc32:  # a flipped byte in a metric would otherwise pass
        raise CorruptSnapshotError(f"{where}: {META_NAME} does not match the CRC-32 in the zip directory")
    try:
        meta = json.loads(raw)
        if not isinstance(meta, dict):
            raise ValueError(f"a JSON {type(meta).__name__}, not an object")
    except (ValueError, RecursionError) as exc:
        raise CorruptSnapshotError(f"{where}: {META_NAME} is not valid: {exc}") from exc
    if meta.get("world_size", 1) > 1:  # one rank's part: alone it is not a snapshot
        raise NotASnapshotError(f"{where} is one rank's part of a distributed save that was never committed")
    info = SnapshotInfo.from_json({**meta, "path": rel, "size": size}, base_url=storage.url)
    Snapshot(storage, info).verify()
    return info
