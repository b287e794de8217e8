"""``SnapshotStore``: save, find and restore training state in a run directory at any fsspec URL.

The store orchestrates; it holds no format or storage logic. A save writes an archive
(:mod:`bucketsnap.archive`) through the storage layer (:mod:`bucketsnap.storage`) and commits it to the
manifest log (:mod:`bucketsnap.manifest`). A load resolves ``which`` in the newest manifest generation and
streams only the requested members' byte ranges.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from bucketsnap._background import BackgroundSaves, SaveFuture
from bucketsnap._host_copies import HostCopies
from bucketsnap._saving import ExternalValue, Prepared, StoredObjects, check_itr, meta, prepare, write_archive
from bucketsnap.copying import copy_objects
from bucketsnap.errors import BucketsnapError, SnapshotExistsError, StorageError
from bucketsnap.info import SnapshotInfo
from bucketsnap.maintenance import DATA_DIRS, collect_garbage, repair
from bucketsnap.manifest import SNAPSHOT_DIR, Manifest, ManifestLog, Which, check_not_swept
from bucketsnap.progress import ProgressCallback
from bucketsnap.retention import RetentionPolicy, split
from bucketsnap.snapshot import Snapshot
from bucketsnap.storage import DEFAULT_PART_SIZE, DEFAULT_UPLOAD_CONCURRENCY, Storage
from bucketsnap.values import MapLocation

if TYPE_CHECKING:
    from bucketsnap.distributed import ProcessGroupArg

__all__ = ["DATA_DIRS", "ExternalValue", "SnapshotStore", "as_store"]

logger = logging.getLogger("bucketsnap")


class SnapshotStore:
    """A run: committed snapshots of training state under one fsspec URL.

    Args:
        url: a local path or fsspec URL (``file://``, ``s3://``, ``gs://``, ``memory://``...).
        storage_options: passed to fsspec (credentials, ``endpoint_url``, ...); never printed.
        compression_level: zstd level for members that compress; members that do not (float weights) are
            detected by sampling and stored in raw zstd blocks, at the cost of a CRC pass.
        compression_threads: zstd worker threads per member (0: compress in the saving thread).
        part_size: bytes buffered per uploaded part on object stores; bounds a save's extra memory.
        upload_concurrency: parts of one save uploaded at once to S3 or GCS; a save holds at most
            ``(upload_concurrency + 1) * part_size`` bytes of upload buffers. On GCS, 1 uses gcsfs's
            resumable upload instead of a parallel composite upload (see :mod:`bucketsnap.uploads`).
        max_in_flight: how many :meth:`save_async` calls may write in the background at once.
        keep_host_copies: keep :meth:`save_async`'s host copy of the state after its save, for the next save
            to copy into (several times faster than fresh memory); False frees it when the save ends.
        retention: a :mod:`bucketsnap.retention` policy applied after each commit (None: keep everything).
            Dropped snapshots leave the manifest at once; their objects are removed by :meth:`gc`.
        single_writer: only one process ever writes this run: on an S3-compatible server that ignores
            conditional writes, commit check-then-write instead of refusing (see docs/backends.md).

    Example:
        >>> import torch
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
        keep_host_copies: bool = True,
        single_writer: bool = False,
    ) -> None:
        self._background: BackgroundSaves[SnapshotInfo] = BackgroundSaves(max_in_flight)
        self._host_copies = HostCopies(keep=keep_host_copies)
        self._storage = Storage(
            url,
            storage_options=storage_options,
            part_size=part_size,
            upload_concurrency=upload_concurrency,
            single_writer=single_writer,
        )
        self._log = ManifestLog(self._storage)
        self.compression_level = compression_level
        self.compression_threads = compression_threads
        self.max_in_flight = max_in_flight
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
        return self._write(prepare(itr, state, metrics, overwrite=overwrite, copy=False), progress)

    def save_async(
        self,
        itr: int,
        state: Mapping[str, Any],
        *,
        metrics: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        progress: ProgressCallback | None = None,
        process_group: ProcessGroupArg = None,
    ) -> SaveFuture[SnapshotInfo]:
        """Copy ``state`` to host memory, then write and commit it in a background thread.

        Returns once the copy is made: the caller may change the model and optimizer right away. At most
        ``max_in_flight`` saves run at once; a call beyond that first waits for the oldest to finish, so the
        memory held by in-flight copies is bounded by ``max_in_flight`` (plus the one being copied) times the
        state's size.

        The host copies of CPU tensors and arrays are kept once their save has ended and reused by the next
        call that needs buffers of the same sizes: memory already faulted in copies several times faster than
        fresh memory. The store thus keeps that memory between saves (one copy of the state when each save
        is awaited before the next; buffers the latest copy did not use are dropped); :meth:`close` releases it,
        and ``keep_host_copies=False`` frees each copy when its save ends.

        A failure is raised once: by the returned future if the caller asks it (``result()`` or
        ``exception()``), otherwise by the next ``save``, ``save_async``, :meth:`flush` or :meth:`close` call,
        so it is never lost. ``progress`` is called as
        in :meth:`save`, from the background thread. ``process_group`` is as in :meth:`save`; the collectives
        run in the background thread too, and every error (even a bad key) is raised by the future, on every rank.
        """
        self._raise_background_error()
        from bucketsnap._distributed_save import save_job  # it imports this module

        lease = self._host_copies.lease()
        try:
            job = save_job(
                self,
                itr,
                state,
                metrics,
                overwrite=overwrite,
                process_group=process_group,
                progress=progress,
                copy=True,
                host_buffer=lease.take,
            )
            if job is None:
                prepared = prepare(itr, state, metrics, overwrite=overwrite, copy=True, host_buffer=lease.take)
                job = functools.partial(self._write, prepared, progress)
        except BaseException:
            lease.release()
            raise
        self._host_copies.drop_free()  # what this copy did not reuse: the pool follows the state's shapes
        return self._background.submit(job, on_end=lease.release)  # gives the buffers back once the job ends

    def flush(self, timeout: float | None = None) -> None:
        """Wait for every :meth:`save_async` in flight; raise the first error not yet raised.

        Raises:
            TimeoutError: saves were still running after ``timeout`` seconds (they go on in the background).
        """
        self._background.flush(timeout, where=self.url)

    def _pending(self) -> list[SaveFuture[SnapshotInfo]]:
        """The :meth:`save_async` futures not yet done (for :mod:`bucketsnap.preemption`)."""
        return self._background.pending()

    def close(self) -> None:
        """Wait for in-flight saves, stop the background thread and free the kept host copies; raise an error
        not yet raised."""
        try:
            self._background.close(where=self.url)
        finally:
            self._host_copies.drop_free()

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

    def _raise_background_error(self) -> None:
        self._background.raise_failure()

    def _write(self, prepared: Prepared, progress: ProgressCallback | None = None) -> SnapshotInfo:
        """Write an archive from encoded values and commit it."""
        staged = self._stage(prepared, progress)
        self._commit_new(staged.info, staged.base, overwrite=prepared.overwrite, written=[staged.info.path])
        logger.info("committed itr %d to %s (%d bytes)", staged.info.itr, self.url, staged.info.size)
        return staged.info

    def _stage(self, prepared: Prepared, progress: ProgressCallback | None = None) -> _Staged:
        """Write the objects of a save, not yet committed, and the generation they were written after."""
        itr = prepared.itr
        base = self._log.read()  # before any object is written: what gc may have swept since is told from it
        if not prepared.overwrite and base.find(itr) is not None:
            raise self._exists(itr)
        created = datetime.now(timezone.utc)
        token = uuid.uuid4().hex[:16]
        written = write_archive(
            self._storage,
            f"{SNAPSHOT_DIR}/{itr:012d}-{token}.zip",
            prepared.values,
            meta(itr, created, prepared.metrics),
            level=self.compression_level,
            threads=self.compression_threads,
            objects=StoredObjects(frozenset(base.referenced()), token),
            progress=progress,
        )
        info = SnapshotInfo(
            itr=itr,
            path=written.path,
            url=self._storage.url_of(written.path),
            size=written.size,
            created=created,
            metrics=prepared.metrics,
            members=written.members,
            refs=written.refs,
            checksums={written.path: written.checksum},
        )
        return _Staged(info, base)

    def _commit_new(self, info: SnapshotInfo, base: Manifest, *, overwrite: bool, written: list[str]) -> Manifest:
        """Commit ``info``, whose objects were written or found referenced after reading ``base``.

        Once the commit has landed nothing deletes its objects, and it is reported as committed: cleanup that
        fails afterwards is a warning. ``written`` (this save's archives) are deleted only when this save's own
        check refused the commit; when its outcome is unknown they are left to gc. The archive of a snapshot
        an overwrite replaces is deleted through a sweep recorded by the commit (see :meth:`delete`).
        """
        doomed: set[str] = set()
        refused: list[BaseException] = []

        def add(current: Manifest) -> Manifest:
            doomed.clear()
            old = current.find(info.itr)
            if old is not None and old.path == info.path:  # this very commit landed already (a lost response)
                return current
            try:
                if old is not None and not overwrite:
                    raise self._exists(info.itr)
                check_not_swept(base, current, info.objects(), self.url)
            except BucketsnapError as exc:
                refused.append(exc)
                raise
            kept = [s for s in current.snapshots if s.itr != info.itr] + [info]
            doomed.update(_archives_to_delete([old] if old is not None else [], kept))
            return current.with_snapshots(kept).with_sweep(doomed)

        try:
            committed = self._log.commit_state(add)
        except BaseException as exc:
            if refused:  # refused by its own check: no generation references them
                self._delete_quietly(written)
                raise
            # A lost response (or a conflict after one) can hide a create that succeeded: look before reporting.
            try:
                current: Manifest | None = self._log.read()
            except Exception:
                current = None
            landed = None if current is None else current.find(info.itr)
            if current is None or landed is None or landed.path != info.path:
                if isinstance(exc, Exception):
                    logger.warning(
                        "the commit of itr %d to %s may not have landed; its objects are left to gc()",
                        info.itr,
                        self.url,
                    )
                raise
            logger.warning("itr %d was committed to %s although the commit reported: %s", info.itr, self.url, exc)
            committed = current
        self._delete_swept(doomed, committed, f"itr {info.itr} is committed")
        self._apply_retention(committed)
        return committed

    def _delete_quietly(self, paths: list[str]) -> None:
        for rel in paths:
            try:
                self._storage.delete(rel)
            except BucketsnapError as exc:  # unreferenced: gc removes it later
                logger.warning("could not delete %s after a failed save: %s", self._storage.url_of(rel), exc)

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
        except Exception as exc:  # the save is committed: a failed prune must not turn it into a failure
            logger.warning("could not apply %r to %s; the next commit retries: %s", policy, self.url, exc)
            return
        logger.info("retention %r dropped itrs %s from %s", policy, dropped, self.url)

    def delete(self, itr: int) -> None:
        """Uncommit snapshot ``itr`` and delete its archive; the chunks it shared by content go with :meth:`gc`.

        The generation that drops it records the archive as a sweep before it is deleted, so that a save that
        found the archive needed a moment ago sees the deletion when it commits (docs/protocol.md).

        Raises:
            SnapshotNotFoundError: no snapshot ``itr`` is committed.
        """
        itr = check_itr(itr)
        doomed: set[str] = set()
        found: list[SnapshotInfo] = []

        def remove(current: Manifest) -> Manifest:
            if found and current.find(itr) is None:
                # Found on an earlier attempt, gone now: our create landed although it reported a conflict (a
                # lost response, retried), or another writer deleted it. Either way it is deleted.
                return current
            found[:] = [current.resolve(itr, self.url)]
            kept = [s for s in current.snapshots if s.itr != itr]
            doomed.clear()
            doomed.update(_archives_to_delete(found, kept))
            return current.with_snapshots(kept).with_sweep(doomed)

        committed = self._log.commit_state(remove)
        self._delete_swept(doomed, committed, f"itr {itr} is deleted from the manifest")

    def _delete_swept(self, doomed: set[str], committed: Manifest, done: str) -> None:
        """Delete the objects of ``doomed`` that a sweep recorded in ``committed`` deletes; a failure is a
        warning (the objects are unreferenced: gc condemns and removes them later)."""
        recorded = {rel for sweep in committed.sweeps for rel in sweep.deleting}
        for rel in sorted(doomed & recorded):
            try:
                self._storage.delete(rel)
            except BucketsnapError as exc:
                logger.warning("%s at %s, but deleting %s failed (gc() removes it): %s", done, self.url, rel, exc)

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
        base = self._log.read()
        if not overwrite and base.find(info.itr) is not None:
            raise self._exists(info.itr)
        deleting = {rel for sweep in base.sweeps for rel in sweep.deleting} - base.referenced()
        if deleting & set(info.refs):
            raise StorageError(
                f"not copied to {self.url}: the snapshot shares {sorted(deleting & set(info.refs))[0]}, which a gc of "
                "this run has committed to delete (it was dropped here before), so a copy of it could be lost to that "
                "gc. Nothing was copied; copy into another run, or retry once gc has run a few more times here."
            )
        copied, written = copy_objects(src.storage, info, self._storage, progress=progress)
        self._commit_new(copied, base, overwrite=overwrite, written=list(written))
        logger.info("copied itr %d from %s to %s (%d bytes)", info.itr, src.url, self.url, copied.size)
        return copied

    # -- maintenance ---------------------------------------------------------------------------------------

    def gc(self, *, min_age: float = 3600.0, dry_run: bool = False) -> list[str]:
        """Delete what no committed snapshot needs; return the removed paths (relative to the run).

        Condemns, in a commit, every object under ``snapshots/`` and ``chunks/`` that no committed snapshot
        needs (orphans of crashed or failed saves, snapshots dropped by retention, saves still in flight), then
        deletes, after another commit, those that an earlier call condemned at least ``min_age`` seconds ago
        (by this process's clock) and that are still unreferenced; also manifest generations older than the
        newest :data:`~bucketsnap.manifest.KEEP_GENERATIONS`. Deletions are ordered against commits through the
        log, so no clock, pause or reuse can make a commit reference a deleted object: a save whose objects were
        deleted fails with ``StorageError`` instead. ``min_age`` gives readers of dropped snapshots and saves in
        flight that long; ``min_age=0`` deletes every unreferenced object in one call, failing saves in flight.
        With ``dry_run``, commits nothing and returns what a call would delete now.

        Example:
            >>> from bucketsnap import KeepLast
            >>> store = SnapshotStore("memory://doc/gc", retention=KeepLast(1))
            >>> _ = store.save(1, {"step": 1}), store.save(2, {"step": 2})
            >>> store.gc()  # condemns itr 1's archive; a later gc, an hour on, deletes it
            []
            >>> [path.split("-")[0] for path in store.gc(min_age=0)]
            ['snapshots/000000000001']
        """
        return collect_garbage(self._log, min_age=min_age, dry_run=dry_run)

    def repair(self) -> Manifest:
        """Commit a new manifest generation rebuilt after a corrupt one.

        Starts from the newest generation that parses, and adds every intact archive under ``snapshots/`` whose
        itr it does not list (read from the archive's own ``meta.json``). Use it when a load reports a corrupt
        manifest; it never deletes anything.
        """
        return repair(self._log)

    def _exists(self, itr: int) -> SnapshotExistsError:
        return SnapshotExistsError(
            f"itr {itr} is already committed at {self.url}; pass overwrite=True to replace it, or save a new itr"
        )


def _archives_to_delete(dropped: list[SnapshotInfo], kept: list[SnapshotInfo]) -> set[str]:
    """The archives of ``dropped`` snapshots that no snapshot of ``kept`` needs.

    Objects shared by content (``refs``: replay-buffer chunks) are left to gc, which condemns them first.
    """
    needed = set().union(*(s.objects() for s in kept))
    return {rel for s in dropped for rel in s.objects() if rel not in s.refs} - needed


@dataclass(frozen=True)
class _Staged:
    """A save whose objects are written, and the generation read before they were."""

    info: SnapshotInfo
    base: Manifest


def as_store(url_or_store: str | SnapshotStore, *, storage_options: dict[str, Any] | None = None) -> SnapshotStore:
    """``url_or_store`` itself if it is a store, else a new :class:`SnapshotStore` at that URL."""
    if isinstance(url_or_store, SnapshotStore):
        if storage_options:
            raise ValueError("storage_options apply to a URL; this is already a SnapshotStore")
        return url_or_store
    return SnapshotStore(url_or_store, storage_options=storage_options)
