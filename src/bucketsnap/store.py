"""``SnapshotStore``: save, find and restore training state in a run directory at any fsspec URL.

The store orchestrates; it holds no format or storage logic. A save writes an archive
(:mod:`bucketsnap.archive`) through the storage layer (:mod:`bucketsnap.storage`) and commits it to the
manifest log (:mod:`bucketsnap.manifest`). A load resolves ``which`` in the newest manifest generation and
streams only the requested members' byte ranges.
"""

from __future__ import annotations

import functools
import json
import logging
import platform
import re
import threading
import uuid
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch

from bucketsnap._version import __version__
from bucketsnap.archive import META_NAME, ArchiveWriter, data_offset, read_directory
from bucketsnap.errors import (
    BucketsnapError,
    CorruptSnapshotError,
    NotASnapshotError,
    SnapshotExistsError,
    StorageError,
)
from bucketsnap.info import Metric, SnapshotInfo, check_metrics
from bucketsnap.manifest import (
    KEEP_GENERATIONS,
    MANIFEST_DIR,
    SNAPSHOT_DIR,
    Manifest,
    ManifestLog,
    Which,
    generation_name,
)
from bucketsnap.progress import ByteCounter, ProgressCallback
from bucketsnap.retention import RetentionPolicy, split
from bucketsnap.snapshot import Snapshot
from bucketsnap.storage import DEFAULT_PART_SIZE, DEFAULT_UPLOAD_CONCURRENCY, Storage
from bucketsnap.transfer import copy_objects
from bucketsnap.values import EncodedValue, MapLocation, encode

if TYPE_CHECKING:
    from bucketsnap.distributed import ProcessGroupArg

__all__ = ["ExternalValue", "SnapshotStore", "as_store"]

logger = logging.getLogger("bucketsnap")

#: Directories of data objects that gc sweeps: archives, and content-addressed chunks shared by snapshots.
DATA_DIRS = (SNAPSHOT_DIR, "chunks")


@runtime_checkable
class ExternalValue(Protocol):
    """A state value stored partly in objects of its own, such as a replay buffer's content-addressed chunks.

    The store calls :meth:`host_copy` in the caller's thread for :meth:`SnapshotStore.save_async`, then
    :meth:`write_objects` before it writes the archive: the returned value becomes the key's member, and the
    returned paths (relative to the run) the snapshot's ``refs``, so gc and delete keep those objects while any
    committed snapshot needs them. Objects are written before the commit and never deleted by a failed save
    (another snapshot may share them); gc removes them once no committed snapshot refers to them.
    """

    def host_copy(self) -> ExternalValue:
        """A copy that stays valid while the caller changes the original (for background saves)."""
        ...

    def write_objects(self, storage: Storage) -> tuple[Any, list[str]]:
        """Write the objects that are missing; return the member value and every object path it needs."""
        ...


_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}$")


class SnapshotStore:
    """A run: committed snapshots of training state under one fsspec URL.

    Args:
        url: a local path or fsspec URL (``file://``, ``s3://``, ``gs://``, ``memory://``...).
        storage_options: passed to fsspec (credentials, ``endpoint_url``, ...); never printed.
        compression_level: zstd level for members that compress; members that do not (float weights) are
            detected by sampling and stored in raw zstd blocks, at the cost of a CRC pass.
        compression_threads: zstd worker threads per member (0: compress in the saving thread).
        part_size: bytes buffered per uploaded part on object stores; bounds a save's extra memory.
        upload_concurrency: parts of one save uploaded at once to S3; a save holds at most
            ``(upload_concurrency + 1) * part_size`` bytes of upload buffers.
        max_in_flight: how many :meth:`save_async` calls may write in the background at once.
        retention: a :mod:`bucketsnap.retention` policy applied after each commit (None: keep everything).
            Dropped snapshots leave the manifest at once; their objects are removed by :meth:`gc`.

    Example:
        >>> store = SnapshotStore("memory://doc/run")
        >>> info = store.save(10, {"policy": {"w": torch.zeros(2)}, "step": 10}, metrics={"return": 1.5})
        >>> store.itrs()
        [10]
        >>> store.load("last", keys=["step"])
        {'step': 10}
    """

    def __init__(
        self,
        url: str,
        *,
        storage_options: dict[str, Any] | None = None,
        compression_level: int = 3,
        compression_threads: int = 0,
        part_size: int = DEFAULT_PART_SIZE,
        upload_concurrency: int = DEFAULT_UPLOAD_CONCURRENCY,
        max_in_flight: int = 1,
        retention: RetentionPolicy | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, not {max_in_flight}")
        self._storage = Storage(
            url, storage_options=storage_options, part_size=part_size, upload_concurrency=upload_concurrency
        )
        self._log = ManifestLog(self._storage)
        self.compression_level = compression_level
        self.compression_threads = compression_threads
        self.max_in_flight = max_in_flight
        self._executor: ThreadPoolExecutor | None = None
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._lock = threading.Lock()
        self._in_flight: set[Future[SnapshotInfo]] = set()
        self._errors: list[BaseException] = []
        if retention is not None and not isinstance(retention, RetentionPolicy):
            raise TypeError(f"retention must be a bucketsnap.retention policy such as KeepLast(3), not {retention!r}")
        self.retention = retention

    @property
    def url(self) -> str:
        """The run's URL, credentials redacted."""
        return self._storage.url

    @property
    def storage(self) -> Storage:
        """The storage layer this store writes through."""
        return self._storage

    @property
    def conflicts(self) -> int:
        """How many commits this store had to retry because another writer committed first."""
        return self._log.conflicts

    def __repr__(self) -> str:
        return f"SnapshotStore({self.url!r})"

    # -- writing -------------------------------------------------------------------------------------------

    def save(
        self,
        itr: int,
        state: Mapping[str, Any],
        *,
        metrics: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        progress: ProgressCallback | None = None,
        process_group: ProcessGroupArg = None,
    ) -> SnapshotInfo:
        """Write ``state`` as snapshot ``itr`` and commit it.

        Each top-level key becomes one archive member that can be loaded alone. The snapshot is committed
        (visible to readers) only once the whole archive is stored. ``progress(done, total)`` is called with
        the uncompressed bytes written so far (see :mod:`bucketsnap.progress`).

        With ``torch.distributed`` initialised (or a ``process_group`` given) the save is collective: every
        rank calls it, writes its own members, and one commit makes them visible together; values wrapped in
        :class:`~bucketsnap.Sharded` are per-rank (see :mod:`bucketsnap.distributed`). Pass
        ``process_group="local"`` to save from this process alone.

        Raises:
            SnapshotExistsError: ``itr`` is already committed and ``overwrite`` is False.
            ValueError: a bad itr, key or metric.
            StorageError: the backend failed; nothing was committed.
            Exception: the error of an earlier :meth:`save_async` that nobody has seen raised yet.
        """
        self._raise_background_error()
        from bucketsnap._distributed_save import save_job  # it imports this module

        job = save_job(self, itr, state, metrics, overwrite=overwrite, process_group=process_group, progress=progress)
        if job is not None:
            return job()
        return self._write(_prepare(itr, state, metrics, overwrite=overwrite, copy=False), progress)

    def save_async(
        self,
        itr: int,
        state: Mapping[str, Any],
        *,
        metrics: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        progress: ProgressCallback | None = None,
        process_group: ProcessGroupArg = None,
    ) -> Future[SnapshotInfo]:
        """Copy ``state`` to host memory, then write and commit it in a background thread.

        Returns once the copy is made: the caller may change the model and optimizer right away. At most
        ``max_in_flight`` saves run at once; a call beyond that first waits for the oldest to finish, so the
        memory held by in-flight copies is bounded by ``max_in_flight`` (plus the one being copied) times the
        state's size.

        A failure is raised by the returned future's ``result()``, and also by the next ``save``,
        ``save_async``, :meth:`flush` or :meth:`close` call, so it is never lost. ``progress`` is called as
        in :meth:`save`, from the background thread. ``process_group`` is as in :meth:`save`; the collectives
        run in the background thread too, and every error (even a bad key) is raised by the future, on every rank.
        """
        self._raise_background_error()
        from bucketsnap._distributed_save import save_job  # it imports this module

        job = save_job(
            self, itr, state, metrics, overwrite=overwrite, process_group=process_group, progress=progress, copy=True
        )
        if job is None:
            prepared = _prepare(itr, state, metrics, overwrite=overwrite, copy=True)
            job = functools.partial(self._write, prepared, progress)
        self._slots.acquire()
        try:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="bucketsnap-save")
            future = self._executor.submit(job)
        except BaseException:
            self._slots.release()
            raise
        with self._lock:
            self._in_flight.add(future)
        future.add_done_callback(self._async_done)
        return future

    def flush(self, timeout: float | None = None) -> None:
        """Wait for every :meth:`save_async` in flight; raise the first error not yet raised.

        Raises:
            TimeoutError: saves were still running after ``timeout`` seconds (they go on in the background).
        """
        with self._lock:
            pending = list(self._in_flight)
        _, not_done = wait(pending, timeout=timeout)
        if not_done:
            raise TimeoutError(f"{len(not_done)} save(s) to {self.url} still running after {timeout} s")
        self._raise_background_error()

    def _pending(self) -> list[Future[SnapshotInfo]]:
        """The :meth:`save_async` futures not yet done (for :mod:`bucketsnap.preemption`)."""
        with self._lock:
            return list(self._in_flight)

    def close(self) -> None:
        """Wait for in-flight saves and stop the background thread; raise an error not yet raised."""
        try:
            self.flush()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def __enter__(self) -> SnapshotStore:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc is None:
            self.close()
            return
        try:  # already unwinding: wait for the saves, but do not mask the error being raised
            self.close()
        except Exception as background:
            logger.error("background save failed while %s was being raised: %s", exc_type, background)

    def _async_done(self, future: Future[SnapshotInfo]) -> None:
        with self._lock:
            self._in_flight.discard(future)
            error = future.exception() if not future.cancelled() else None
            if error is not None:
                self._errors.append(error)
        self._slots.release()

    def _raise_background_error(self) -> None:
        with self._lock:
            error = self._errors.pop(0) if self._errors else None
        if error is not None:
            raise error

    def _write(self, prepared: _Prepared, progress: ProgressCallback | None = None) -> SnapshotInfo:
        """Write an archive from encoded values and commit it."""
        itr = prepared.itr
        if not prepared.overwrite and self._log.read().find(itr) is not None:
            raise self._exists(itr)
        refs: set[str] = set()
        values: dict[str, EncodedValue] = {}
        for key, value in prepared.values.items():
            if isinstance(value, EncodedValue):
                values[key] = value
                continue
            member, paths = value.write_objects(self._storage)
            values[key] = encode(member)
            refs.update(paths)
        created = datetime.now(timezone.utc)
        path = f"{SNAPSHOT_DIR}/{itr:012d}-{uuid.uuid4().hex[:16]}.zip"
        counter = None
        if progress is not None:
            counter = ByteCounter(sum(v.raw_size for v in values.values()), progress)
        with self._storage.write(path) as f:
            writer = ArchiveWriter(
                f,
                level=self.compression_level,
                threads=self.compression_threads,
                progress=None if counter is None else counter.add,
            )
            for key, encoded in values.items():
                writer.add_encoded(key, encoded)
            # refs go into meta.json too, so that repair() recovers a snapshot with the chunks it needs
            size = writer.finish({**_meta(itr, created, prepared.metrics), **({"refs": sorted(refs)} if refs else {})})
        stored = self._storage.size(path)
        if stored != size:  # an upload that reported success but kept other bytes: never commit it
            self._storage.delete(path)
            raise StorageError(
                f"{self._storage.url_of(path)} holds {stored} bytes after writing {size}; nothing was committed. "
                "Retry the save."
            )
        info = SnapshotInfo(
            itr=itr,
            path=path,
            url=self._storage.url_of(path),
            size=size,
            created=created,
            metrics=prepared.metrics,
            members=dict(writer.members),
            refs=tuple(sorted(refs)),
        )
        self._commit_new(info, overwrite=prepared.overwrite)
        logger.info("committed itr %d to %s (%d bytes)", itr, self.url, size)
        return info

    def _commit_new(self, info: SnapshotInfo, *, overwrite: bool) -> None:
        replaced: list[SnapshotInfo] = []

        def add(current: Manifest) -> list[SnapshotInfo]:
            old = current.find(info.itr)
            if old is not None and not overwrite:
                raise self._exists(info.itr)
            replaced[:] = [old] if old is not None else []
            return [s for s in current.snapshots if s.itr != info.itr] + [info]

        try:
            committed = self._log.commit(add)
        except BaseException as exc:
            # A lost response can hide a create that succeeded: look before deleting what may be committed.
            try:
                current: Manifest | None = self._log.read()
            except Exception:
                current = None  # cannot tell: leave the archive to gc
            landed = current is not None and any(s.path == info.path for s in current.snapshots)
            if not landed or not isinstance(exc, Exception):
                if current is not None and not landed:
                    self._storage.delete(info.path)  # never committed: do not leave it for gc
                raise
            logger.warning("itr %d was committed to %s although the commit reported: %s", info.itr, self.url, exc)
            committed = current  # type: ignore[assignment]
        self._delete_unreferenced(replaced, committed)
        self._apply_retention(committed)

    def _apply_retention(self, committed: Manifest) -> None:
        """Commit a generation without the snapshots ``retention`` drops; leave their objects to :meth:`gc`.

        Only the manifest changes, after the new snapshot is committed, so a run never lacks a loadable
        snapshot, and a reader that resolved a dropped snapshot a moment ago can finish reading it. A failed
        prune is logged, not raised (the save itself is committed), and redone by the next commit.
        """
        policy = self.retention
        if policy is None or not split(policy, committed.snapshots)[1]:
            return
        dropped: list[int] = []

        def prune(current: Manifest) -> list[SnapshotInfo]:
            kept, gone = split(policy, current.snapshots)
            dropped[:] = [s.itr for s in gone]
            return kept

        try:
            self._log.commit(prune)
        except BucketsnapError as exc:
            logger.warning("could not apply %r to %s; the next commit retries: %s", policy, self.url, exc)
            return
        logger.info("retention %r dropped itrs %s from %s", policy, dropped, self.url)

    def delete(self, itr: int) -> None:
        """Uncommit snapshot ``itr`` and delete its archive.

        Raises:
            SnapshotNotFoundError: no snapshot ``itr`` is committed.
        """
        itr = _check_itr(itr)
        removed: list[SnapshotInfo] = []

        def remove(current: Manifest) -> list[SnapshotInfo]:
            removed[:] = [current.resolve(itr, self.url)]
            return [s for s in current.snapshots if s.itr != itr]

        committed = self._log.commit(remove)
        self._delete_unreferenced(removed, committed)

    def _delete_unreferenced(self, dropped: list[SnapshotInfo], manifest: Manifest) -> None:
        """Delete the objects of ``dropped`` snapshots that no snapshot in ``manifest`` still needs."""
        still_needed = set().union(*(s.objects() for s in manifest.snapshots))
        for rel in sorted(set().union(*(s.objects() for s in dropped)) - still_needed):
            self._storage.delete(rel)

    # -- reading -------------------------------------------------------------------------------------------

    def itrs(self) -> list[int]:
        """The committed itrs, ascending."""
        return self._log.read().itrs()

    def infos(self) -> list[SnapshotInfo]:
        """Every committed snapshot's info, ascending by itr."""
        return list(self._log.read().snapshots)

    def info(self, which: Which = "last") -> SnapshotInfo:
        """The info of snapshot ``which``: ``"last"``, ``"first"`` or an int itr.

        Raises:
            SnapshotNotFoundError: the run is empty or has no such itr.
            ValueError: ``which`` is none of those.
        """
        return self._log.read().resolve(which, self.url)

    def open(self, which: Which = "last", *, map_location: MapLocation = None, allow_pickle: bool = False) -> Snapshot:
        """A lazy view of snapshot ``which``: members are read only when indexed."""
        return Snapshot(self._storage, self.info(which), map_location=map_location, allow_pickle=allow_pickle)

    def load(
        self,
        which: Which = "last",
        *,
        keys: Iterable[str] | None = None,
        map_location: MapLocation = None,
        allow_pickle: bool = False,
        progress: ProgressCallback | None = None,
    ) -> dict[str, Any]:
        """Load snapshot ``which`` (only ``keys`` if given) into a dict.

        Args:
            which: ``"last"``, ``"first"`` or an int itr.
            keys: the top-level keys to read; the others are not downloaded.
            map_location: as in ``torch.load``: a device, a ``{saved: target}`` dict, or a callable
                ``(tensor, saved_device) -> tensor``.
            allow_pickle: allow values that can only be restored by unpickling (code from the snapshot runs).
            progress: called as ``progress(done, total)`` with the stored bytes read so far.

        Raises:
            SnapshotNotFoundError, CorruptSnapshotError, UnsafeLoadError, KeyError (an unknown key).
        """
        return self.open(which, map_location=map_location, allow_pickle=allow_pickle).load(keys, progress=progress)

    def verify(self, which: Which = "last", *, progress: ProgressCallback | None = None) -> SnapshotInfo:
        """Re-read every member of snapshot ``which`` and check its checksums and sizes.

        Raises:
            CorruptSnapshotError: a member or the archive does not match what was committed.
        """
        return self.open(which).verify(progress=progress)

    def copy_from(
        self,
        source: str | SnapshotStore,
        which: Which = "last",
        *,
        overwrite: bool = False,
        progress: ProgressCallback | None = None,
    ) -> SnapshotInfo:
        """Copy committed snapshot ``which`` of ``source`` (another run, on any backend) into this run.

        The objects are streamed in ranged chunks to new unique names here, every member's CRC-32 checked on
        the way, then committed with the same protocol as :meth:`save`, under the same itr, metrics and
        creation time. ``progress(done, total)`` is called with the bytes copied so far.

        Raises:
            SnapshotExistsError: the itr is already committed here and ``overwrite`` is False.
            SnapshotNotFoundError: ``source`` has no snapshot ``which``, or one of its objects is missing.
            CorruptSnapshotError: the source's bytes do not match what it committed; nothing is committed.
        """
        src = as_store(source)
        info = src.info(which)
        if not overwrite and self._log.read().find(info.itr) is not None:
            raise self._exists(info.itr)
        copied, written = copy_objects(src.storage, info, self._storage, progress=progress)
        try:
            self._commit_new(copied, overwrite=overwrite)
        except BaseException:
            for rel in written:
                self._storage.delete(rel)
            raise
        logger.info("copied itr %d from %s to %s (%d bytes)", info.itr, src.url, self.url, copied.size)
        return copied

    # -- maintenance ---------------------------------------------------------------------------------------

    def gc(self, *, min_age: float = 3600.0, dry_run: bool = False) -> list[str]:
        """Delete what no committed snapshot needs; return the removed paths (relative to the run).

        Removes archives the newest manifest does not reference (orphans of crashed or failed saves, pruned
        snapshots) once they are older than ``min_age`` seconds, so that a concurrent writer's archive, written
        but not yet committed, is left alone; and manifest generations older than the newest
        :data:`~bucketsnap.manifest.KEEP_GENERATIONS`. Never removes anything committed.
        """
        now = datetime.now(timezone.utc).timestamp()
        manifest = self._log.read()
        referenced = set().union(*(s.objects() for s in manifest.snapshots))
        doomed: list[str] = []
        for directory in DATA_DIRS:
            for name in self._storage.list(directory):
                rel = f"{directory}/{name}"
                if rel in referenced:
                    continue
                modified = self._storage.modified(rel)
                if min_age <= 0 or modified is None or now - modified >= min_age:
                    doomed.append(rel)
        generations = self._log.generations()
        doomed += [generation_name(g) for g in generations if g < manifest.generation - KEEP_GENERATIONS]
        for name in self._storage.list(MANIFEST_DIR):  # temp files of commits interrupted by a crash
            rel = f"{MANIFEST_DIR}/{name}"
            if ".tmp-" in name and (min_age <= 0 or now - (self._storage.modified(rel) or now) >= min_age):
                doomed.append(rel)
        if not dry_run:
            for rel in doomed:
                self._storage.delete(rel)
        return doomed

    def repair(self) -> Manifest:
        """Commit a new manifest generation rebuilt after a corrupt one.

        Starts from the newest generation that parses, and adds every intact archive under ``snapshots/`` whose
        itr it does not list (read from the archive's own ``meta.json``). Use it when a load reports a corrupt
        manifest; it never deletes anything.
        """
        base = Manifest(0)
        for generation in reversed(self._log.generations()):
            try:
                base = self._log.read_generation(generation)
                break
            except (CorruptSnapshotError, FileNotFoundError) as exc:
                logger.warning("skipping manifest generation %d: %s", generation, exc)
        known = {s.itr: s for s in base.snapshots}
        for name in self._storage.list(SNAPSHOT_DIR):
            rel = f"{SNAPSHOT_DIR}/{name}"
            if not name.endswith(".zip") or name.startswith(".") or any(rel in s.objects() for s in base.snapshots):
                continue
            try:
                info = self._recover_info(rel)
            except (BucketsnapError, FileNotFoundError) as exc:
                logger.warning("not recovering %s: %s", self._storage.url_of(rel), exc)
                continue
            if info.itr not in known or info.created > known[info.itr].created:
                known[info.itr] = info

        def merged(current: Manifest) -> list[SnapshotInfo]:
            # Commits made since (by another writer, or another repair) win over what was recovered.
            return list({**known, **{s.itr: s for s in current.snapshots}}.values())

        return self._log.commit(merged, over_corrupt=True)

    def _recover_info(self, rel: str) -> SnapshotInfo:
        size = self._storage.size(rel)
        where = self._storage.url_of(rel)

        def read_range(start: int, end: int) -> bytes:
            return self._storage.read(rel, start, end)

        entries = read_directory(read_range, size, where=where)
        if META_NAME not in entries:
            raise CorruptSnapshotError(f"{where} has no {META_NAME}")
        entry = entries[META_NAME]
        start = data_offset(read_range, entry, size, where=where)
        try:
            meta = json.loads(read_range(start, start + entry.stored_size))
            if not isinstance(meta, dict):
                raise ValueError(f"a JSON {type(meta).__name__}, not an object")
        except (ValueError, RecursionError) as exc:
            raise CorruptSnapshotError(f"{where}: {META_NAME} is not valid: {exc}") from exc
        if meta.get("world_size", 1) > 1:  # one rank's part: alone it is not a snapshot
            raise NotASnapshotError(f"{where} is one rank's part of a distributed save that was never committed")
        info = SnapshotInfo.from_json({**meta, "path": rel, "size": size}, base_url=self._storage.url)
        Snapshot(self._storage, info).verify()
        return info

    def _exists(self, itr: int) -> SnapshotExistsError:
        return SnapshotExistsError(
            f"itr {itr} is already committed at {self.url}; pass overwrite=True to replace it, or save a new itr"
        )


@dataclass(frozen=True)
class _Prepared:
    """A validated, encoded save, ready to be written by any thread."""

    itr: int
    values: dict[str, EncodedValue | ExternalValue]
    metrics: dict[str, Metric]
    overwrite: bool


def _prepare(itr: Any, state: Any, metrics: Mapping[str, Any] | None, *, overwrite: bool, copy: bool) -> _Prepared:
    itr = _check_itr(itr)
    _check_state(state)
    metric_values = check_metrics(dict(metrics or {}))
    values = {key: _prepare_value(value, copy=copy) for key, value in state.items()}
    return _Prepared(itr, values, metric_values, overwrite)


def _prepare_value(value: Any, *, copy: bool) -> EncodedValue | ExternalValue:
    if isinstance(value, ExternalValue):
        return value.host_copy() if copy else value
    return encode(value, copy=copy)


def _meta(itr: int, created: datetime, metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": "bucketsnap",
        "itr": itr,
        "created": created.isoformat(),
        "metrics": metrics,
        "library": {
            "bucketsnap": __version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
    }


def _check_itr(itr: Any) -> int:
    if isinstance(itr, bool) or not isinstance(itr, (int, np.integer)) or itr < 0:
        raise ValueError(f"itr must be a non-negative int, not {itr!r}")
    return int(itr)


def _check_state(state: Any) -> None:
    if not isinstance(state, Mapping):
        raise ValueError(f"state must be a dict of key -> value, not {type(state).__name__}")
    if not state:
        raise ValueError("state is empty: pass at least one key, such as {'policy': model.state_dict()}")
    for key in state:
        if not isinstance(key, str) or not _KEY.match(key):
            raise ValueError(
                f"state key {key!r} is not a valid member name: use 1-200 letters, digits, '_', '-' or '.', "
                "not starting with '.' or '-'"
            )


def as_store(url_or_store: str | SnapshotStore, *, storage_options: dict[str, Any] | None = None) -> SnapshotStore:
    """``url_or_store`` itself if it is a store, else a new :class:`SnapshotStore` at that URL."""
    if isinstance(url_or_store, SnapshotStore):
        if storage_options:
            raise ValueError("storage_options apply to a URL; this is already a SnapshotStore")
        return url_or_store
    return SnapshotStore(url_or_store, storage_options=storage_options)
