"""Maintenance of a run: garbage collection and repair. Neither ever removes or rewrites a committed snapshot.

**gc** removes objects that no committed snapshot needs, with a grace period ``min_age`` that protects two kinds
of readers and writers that the newest manifest does not show:

* an archive another writer has written but not yet committed: objects no generation ever referenced are
  kept until they are ``min_age`` old;
* a reader that resolved a snapshot a moment before retention or ``delete`` dropped it: objects referenced by
  a retained manifest generation are kept until ``min_age`` after the generation that dropped them was
  written. Only the newest :data:`~bucketsnap.manifest.KEEP_GENERATIONS` generations are kept, so the grace
  covers readers that are fewer than that many commits behind;
* a save in another process that found a replay-buffer chunk stored and is about to commit a snapshot that
  reuses it (chunks are named by their content, so a chunk dropped long ago can be needed again): while the
  retained generations do not reach back ``min_age`` (commits come faster than that), when an unlisted chunk
  was dropped is unknown, and gc keeps every chunk. A busy run thus keeps about ``min_age`` worth of dropped
  chunks until its commits slow down or ``gc(min_age=0)`` runs while no other process saves.

**repair** commits a new generation after a corrupt one: the newest generation that parses, plus every intact
archive it does not list, read from the archive's own ``meta.json``.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

from bucketsnap.archive import META_NAME
from bucketsnap.chunks import CHUNK_DIR
from bucketsnap.errors import BucketsnapError, CorruptSnapshotError, NotASnapshotError
from bucketsnap.info import SnapshotInfo
from bucketsnap.manifest import (
    KEEP_GENERATIONS,
    MANIFEST_DIR,
    SNAPSHOT_DIR,
    Manifest,
    ManifestLog,
    generation_name,
)
from bucketsnap.snapshot import Snapshot
from bucketsnap.zipformat import crc32, data_offset, read_directory

__all__ = ["DATA_DIRS", "collect_garbage", "repair"]

logger = logging.getLogger("bucketsnap")

#: Directories of data objects that gc sweeps: archives, and content-addressed chunks shared by snapshots.
DATA_DIRS = (SNAPSHOT_DIR, CHUNK_DIR)


def collect_garbage(log: ManifestLog, *, min_age: float, dry_run: bool) -> list[str]:
    """Delete (unless ``dry_run``) what no committed snapshot needs; return the paths, relative to the run."""
    storage = log.storage
    now = datetime.now(timezone.utc).timestamp()
    newest = log.read()
    dropped, drops_known = _recently_dropped(log, newest, now - min_age)
    keep = _objects(newest) | dropped
    doomed: list[str] = []
    for directory in DATA_DIRS:
        if directory == CHUNK_DIR and not drops_known and min_age > 0:
            # A chunk no retained generation lists may still have been dropped within min_age, and a save in
            # another process may be about to commit a snapshot that reuses it (chunks are named by content,
            # so an old chunk can be needed again): keep them until commits slow down.
            continue
        for name in storage.list(directory):
            rel = f"{directory}/{name}"
            if rel in keep:
                continue
            modified = storage.modified(rel)
            if min_age <= 0 or modified is None or now - modified >= min_age:
                doomed.append(rel)
    doomed += [generation_name(g) for g in log.generations() if g < newest.generation - KEEP_GENERATIONS]
    for name in storage.list(MANIFEST_DIR):  # temp files of commits interrupted by a crash
        rel = f"{MANIFEST_DIR}/{name}"
        if ".tmp-" in name and (min_age <= 0 or now - (storage.modified(rel) or now) >= min_age):
            doomed.append(rel)
    if not dry_run:
        for rel in doomed:
            storage.delete(rel)
    return doomed


def _objects(manifest: Manifest) -> set[str]:
    return set().union(*(s.objects() for s in manifest.snapshots))


def _recently_dropped(log: ManifestLog, newest: Manifest, since: float) -> tuple[set[str], bool]:
    """Objects of retained generations whose successor was written after ``since`` (a reader may hold them),
    and whether the retained generations reach back to ``since``: if not, an object none of them lists may
    have been dropped after ``since`` too, by a generation already pruned."""
    kept: set[str] = set()
    successor_written = newest.written
    for generation in range(newest.generation - 1, max(0, newest.generation - KEEP_GENERATIONS - 1), -1):
        if successor_written is not None and successor_written.timestamp() < since:
            return kept, True
        try:
            older = log.read_generation(generation)
        except (BucketsnapError, FileNotFoundError):
            return kept, False  # pruned or unreadable: what it dropped, and when, is unknown
        kept |= _objects(older)
        successor_written = older.written
    if newest.generation <= KEEP_GENERATIONS:  # back to the first generation: nothing was dropped earlier
        return kept, True
    return kept, successor_written is not None and successor_written.timestamp() < since


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
    listed = _objects(base)
    for name in storage.list(SNAPSHOT_DIR):
        rel = f"{SNAPSHOT_DIR}/{name}"
        if not name.endswith(".zip") or name.startswith(".") or rel in listed:
            continue
        try:
            info = _recover_info(log, rel)
        except (BucketsnapError, FileNotFoundError) as exc:
            logger.warning("not recovering %s: %s", storage.url_of(rel), exc)
            continue
        if info.itr not in known or info.created > known[info.itr].created:
            known[info.itr] = info

    def merged(current: Manifest) -> list[SnapshotInfo]:
        # Commits made since (by another writer, or another repair) win over what was recovered.
        return list({**known, **{s.itr: s for s in current.snapshots}}.values())

    return log.commit(merged, over_corrupt=True)


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
