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
the generation it commits on (:func:`~bucketsnap._manifest.swept`) and fails with ``StorageError`` instead of
committing a reference to a deleted object: a writer that is paused for hours, that reuses a chunk another
snapshot dropped, or whose clock disagrees with gc's, can fail a save, but never commit a broken one.
``min_age`` only decides how soon space comes back: it gives readers that resolved a dropped snapshot, and
saves in flight, that long to finish (measured on gc's clocks, so a gc host whose clock runs ahead shortens it).
With ``min_age=0`` one call condemns and deletes every unreferenced object, failing any save in flight.

**repair** commits a new generation after a corrupt one: the newest generation that reads, plus every intact
archive it does not list, read from the archive's own ``meta.json``. On a healthy run it commits nothing: an
archive the newest generation does not list was dropped, deleted or never committed (docs/protocol.md, "Repair").
"""

from __future__ import annotations

import json
import logging
import time
import zipfile
from dataclasses import replace

from bucketsnap._archive import META_NAME
from bucketsnap._chunk_names import CHUNK_DIR
from bucketsnap._info import SnapshotInfo, crc32_checksum
from bucketsnap._manifest import (
    KEEP_GENERATIONS,
    MANIFEST_DIR,
    SNAPSHOT_DIR,
    SWEEP_HISTORY,
    Manifest,
    ManifestLog,
    Sweep,
    generation_name,
)
from bucketsnap._pages import PAGE_DIR, MissingPageError, Tree
from bucketsnap._snapshot import Snapshot
from bucketsnap._storage import PROBE_PREFIX, Storage
from bucketsnap._zipformat import RangeReader, read_directory, read_member
from bucketsnap.errors import BucketsnapError, CorruptSnapshotError, NotASnapshotError

__all__ = ["DATA_DIRS", "collect_garbage", "is_archive", "repair"]

logger = logging.getLogger("bucketsnap")

PROBE_GRACE = 3600.0
#: Directories of data objects that gc sweeps: archives, and content-addressed chunks shared by snapshots.
DATA_DIRS = (SNAPSHOT_DIR, CHUNK_DIR)


def collect_garbage(log: ManifestLog, *, min_age: float, dry_run: bool, now: float | None = None) -> list[str]:
    """Condemn what no committed snapshot needs, delete what stayed condemned for ``min_age`` seconds (unless
    ``dry_run``); return the paths deleted (or, with ``dry_run``, that would be), relative to the run."""
    storage = log.storage
    now = time.time() if now is None else now
    newest = log.read()
    stored = {f"{d}/{name}" for d in DATA_DIRS for name in storage.list(d) if not _young_probe(storage, d, name, now)}
    # The pages are listed before the generations are read, so that a commit landing in between has its pages
    # referenced by a generation gc reads (as objects are listed before `newest` is checked, below).
    listed = [n for n in storage.list(PAGE_DIR) if _page_name(storage, n, now)]
    pages = _live_pages(log)
    if pages is not None:  # pages of no generation present; while one cannot be read, gc keeps every page
        stored |= {f"{PAGE_DIR}/{n}" for n in listed} - pages
    unreferenced = stored - newest.referenced()
    if dry_run:
        doomed = {rel for rel in unreferenced if _ripe(newest.condemned.get(rel, now), now, min_age)}
        return sorted(doomed) + _stale_log_files(log, newest, now, min_age)

    if unreferenced - set(newest.condemned):

        def condemn(current: Manifest) -> Manifest:
            still = unreferenced - current.referenced() - current.tree.page_paths()
            return replace(current, condemned={**{rel: now for rel in still}, **current.condemned})

        newest = log.commit_state(condemn)
    deleted: list[str] = []
    if any(_ripe(t, now, min_age) for t in newest.condemned.values()):
        sweep: list[Sweep] = []

        def sweep_ripe(current: Manifest) -> Manifest:
            # A page is deleted only once no generation a reader may still read references it (see _live_pages).
            live = _live_pages(log)
            needed = current.referenced() | current.tree.page_paths() | (live or set())
            if live is None:
                needed |= {rel for rel in current.condemned if rel.startswith(f"{PAGE_DIR}/")}
            ripe = {rel for rel, t in current.condemned.items() if _ripe(t, now, min_age) and rel not in needed}
            # A condemned name that is no longer stored (a local temp file renamed by its save) is forgotten.
            gone = {rel for rel in ripe if rel not in stored}
            ripe -= gone
            sweep[:] = [Sweep(current.sweep + 1, frozenset(ripe))] if ripe else []
            kept = replace(current, condemned={rel: t for rel, t in current.condemned.items() if rel not in gone})
            return kept.with_sweep(ripe)

        newest = log.commit_state(sweep_ripe)
        for rel in sorted(sweep[0].deleting if sweep else ()):  # committed: no save can reference these any more
            storage.delete(rel)
            deleted.append(rel)
    for rel in _stale_log_files(log, newest, now, min_age):
        storage.delete(rel)
        deleted.append(rel)
    return deleted


def _young_probe(storage: Storage, directory: str, name: str, now: float) -> bool:
    """An exclusive-create probe object (:mod:`bucketsnap._storage`) less than an hour old: one being made
    now, whose deletion between its two creates would make the probe misjudge the store. Older ones are the
    leftovers of a crash, and removed."""
    if not name.startswith(PROBE_PREFIX):
        return False
    try:
        modified = storage.modified(f"{directory}/{name}")
    except FileNotFoundError:  # its probe has just deleted it
        return True
    return modified is None or now - modified < PROBE_GRACE


def _live_pages(log: ManifestLog) -> set[str] | None:
    """The pages that some generation present references, or None if one of them cannot be read.

    Only generations present reference pages, and a generation is never created again once pruned (except below
    the newest, by a writer that then retries: see ManifestLog.commit_state), so a page none of them references
    is needed by no reader that lists afresh; one that has just read an older generation reads again.
    """
    live: set[str] = set()
    for generation in log.generations():
        try:
            live |= log.read_generation(generation).tree.page_paths()
        except MissingPageError:
            if generation in log.generations():
                return None  # present, but a page it references is gone: a corrupt run (repair it)
        except FileNotFoundError:
            continue  # pruned since the listing
        except CorruptSnapshotError:
            return None
    return live


def _page_name(storage: Storage, name: str, now: float) -> bool:
    """Whether ``name`` under ``manifest/pages/`` is a page (not a temp file, not a young probe)."""
    return name.endswith(".json") and not name.startswith(".") and not _young_probe(storage, PAGE_DIR, name, now)


def _ripe(condemned_at: float, now: float, min_age: float) -> bool:
    return min_age <= 0 or now - condemned_at >= min_age


def _stale_log_files(log: ManifestLog, newest: Manifest, now: float, min_age: float) -> list[str]:
    """Generations more than KEEP_GENERATIONS behind the newest, and temp files of interrupted local commits.

    Deleting a temp file of a commit still in progress only makes that commit fail (its link finds no file).
    """
    storage = log.storage
    stale = [generation_name(g) for g in log.generations() if g < newest.generation - KEEP_GENERATIONS]
    for directory in (MANIFEST_DIR, PAGE_DIR):
        for name in storage.list(directory):
            rel = f"{directory}/{name}"
            if ".tmp-" not in name or _young_probe(storage, directory, name, now):
                continue
            try:
                modified = storage.modified(rel) or now
            except FileNotFoundError:  # a commit in progress linked it into place and removed it since the listing
                continue
            if _ripe(modified, now, min_age):
                stale.append(rel)
    return stale


def repair(log: ManifestLog, *, from_archives: bool = False) -> Manifest:
    """Commit a generation rebuilt after a corrupt one; on a healthy run, commit nothing and add nothing.

    A run is healthy when its newest generation and every page it references read, or when it has neither a
    generation nor an archive (an empty run): repair then returns that generation unchanged. An archive it does
    not list is then no lost commit: retention dropped it (gc has not swept it yet), its save or overwrite was
    killed before committing, or its save is still in flight, and bringing it back would make dropped, deleted
    or never-committed data visible.

    Over a newest generation that does not read, repair commits the newest generation that reads plus the
    intact archives it does not list. A recovered archive is an object found by listing, so it is fenced as a
    save's objects are: it is not recovered if it, or a chunk it needs, is in a sweep recorded by the generation
    repair started from. If the run is healthy by the time repair commits (another repair fixed it), repair
    commits nothing. A run with archives but no generation at all (its manifest lost, or its first save in
    flight or killed: they look alike) is rebuilt from its archives, as over a corrupt generation, only
    ``from_archives``.
    """
    storage = log.storage
    try:
        newest = log.read()
        newest.snapshots  # noqa: B018 -- a generation whose pages do not read is corrupt too
    except CorruptSnapshotError as exc:
        logger.warning("repairing the manifest of %s: %s", storage.url, exc)
    else:
        if newest.generation or not from_archives or not any(map(is_archive, storage.list(SNAPSHOT_DIR))):
            return _healthy(log, newest)
        logger.warning("%s holds archives but no manifest generation: rebuilding its manifest from them", storage.url)
    base = Manifest(0, Tree(log.pages))
    for generation in reversed(log.generations()):
        try:
            candidate = log.read_generation(generation)
            candidate.snapshots  # noqa: B018 -- a generation whose pages do not read is skipped too
            base = candidate
            break
        except (CorruptSnapshotError, FileNotFoundError) as exc:
            logger.warning("skipping manifest generation %d: %s", generation, exc)
    in_sweeps = {rel for sweep in base.sweeps for rel in sweep.deleting}
    recovered: dict[int, SnapshotInfo] = {}
    listed = storage.list(SNAPSHOT_DIR)
    for name in listed:
        rel = f"{SNAPSHOT_DIR}/{name}"
        if not is_archive(name) or rel in base.referenced() or rel in in_sweeps:
            continue
        try:
            info = _recover_info(log, rel)
        except (BucketsnapError, FileNotFoundError) as exc:
            logger.warning("not recovering %s: %s", storage.url_of(rel), exc)
            continue
        if info.objects() & in_sweeps:
            logger.warning("not recovering %s: gc is deleting objects it needs", storage.url_of(rel))
            continue
        known = recovered.get(info.itr) or base.find(info.itr)
        if known is None or info.created > known.created:
            recovered[info.itr] = info

    def merged(current: Manifest) -> Manifest:
        if not current.unreadable and current.generation:  # healthy now: another repair (or a save) came first
            raise _Healthy(current)
        # Rebuilt over a corrupt generation, whose gc record is lost: keep the last one known, and number
        # the sweeps past any that may have been lost with it. Each commit records at most one sweep more, and
        # a repair sets the number to its generation's + SWEEP_HISTORY, so no generation g ever recorded a
        # sweep above g + SWEEP_HISTORY: this number was never used, and a save in flight cannot mistake a
        # later sweep for one it has seen; it fails instead (see manifest.swept). Which objects the lost
        # sweeps deleted is unknown: repairing a corrupt manifest trusts that no gc runs meanwhile.
        sweep = max(base.sweep + 1, current.generation + 1 + SWEEP_HISTORY)
        current = replace(base, generation=current.generation, sweep=sweep, sweeps=())
        # The lost generation may have deleted or overwritten snapshots of the base (their archives are gone,
        # recorded in its lost sweep): keep only the base's snapshots whose objects are all still stored.
        stored = {f"{SNAPSHOT_DIR}/{n}" for n in listed} | {f"{CHUNK_DIR}/{n}" for n in storage.list(CHUNK_DIR)}
        intact = [s for s in current.snapshots if s.objects() <= stored]
        if len(intact) < current.tree.count:
            logger.warning("repair drops %d snapshot(s) whose objects are gone", current.tree.count - len(intact))
            current = current.with_snapshots(intact)
        return current.with_snapshots({**recovered, **{s.itr: s for s in current.snapshots}}.values())

    try:
        return log.commit_state(merged, over_corrupt=True)
    except _Healthy as healthy:
        return _healthy(log, healthy.manifest)


def is_archive(name: str) -> bool:
    """Whether a name listed under ``snapshots/`` is an archive (not a temp file or another object)."""
    return name.endswith(".zip") and not name.startswith(".")


class _Healthy(Exception):
    """Raised out of repair's change: the newest generation reads, so there is nothing to commit."""

    def __init__(self, manifest: Manifest) -> None:
        super().__init__(manifest.generation)
        self.manifest = manifest


def _healthy(log: ManifestLog, newest: Manifest) -> Manifest:
    logger.info(
        "the manifest of %s is healthy (generation %d and its pages read): nothing to repair, nothing committed",
        log.storage.url,
        newest.generation,
    )
    return newest


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
    # STORED only, as archives write it; its CRC-32 catches a flipped byte in a metric that JSON would pass
    raw = read_member(read_range, entries[META_NAME], size, where=where, methods=(zipfile.ZIP_STORED,))
    try:
        meta = json.loads(raw)
        if not isinstance(meta, dict):
            raise ValueError(f"a JSON {type(meta).__name__}, not an object")
    except (ValueError, RecursionError) as exc:
        raise CorruptSnapshotError(f"{where}: {META_NAME} is not valid: {exc}") from exc
    if meta.get("world_size", 1) > 1:  # one rank's part: alone it is not a snapshot
        raise NotASnapshotError(f"{where} is one rank's part of a distributed save that was never committed")
    # The archive's bytes as they are now get the checksum a save would have recorded; verify then checks its
    # members too, so that nothing is recovered that a save would not have committed.
    checksums = {rel: crc32_checksum(RangeReader(read_range, 0, size, where=where).finish())}
    info = SnapshotInfo.from_json({**meta, "path": rel, "size": size, "checksums": checksums}, base_url=storage.url)
    Snapshot(storage, info).verify()
    return info
