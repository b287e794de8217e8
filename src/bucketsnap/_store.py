"""``SnapshotStore``: save, find and restore training state in a run directory at any fsspec URL.

The store orchestrates; it holds no format, storage or commit logic. A save is validated and encoded
(:mod:`bucketsnap._saving`) in the caller's thread, then planned, written and committed by the save pipeline
(:mod:`bucketsnap._pipeline`), in the caller's thread or in the background (:mod:`bucketsnap._background`).
A process saving alone runs it as a world of one; the ranks of a distributed save run it together
(:mod:`bucketsnap._distributed_save`). A load resolves ``which`` in the newest manifest generation
(:mod:`bucketsnap._manifest`) and streams only the requested members' byte ranges.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from bucketsnap._background import BackgroundSaves, SaveFuture
from bucketsnap._commit import Committer
from bucketsnap._host_copies import HostCopies
from bucketsnap._info import SnapshotInfo
from bucketsnap._maintenance import DATA_DIRS, collect_garbage, repair
from bucketsnap._manifest import Manifest, ManifestLog, Which
from bucketsnap._pipeline import SavePipeline, Staged
from bucketsnap._progress import ProgressCallback
from bucketsnap._saving import ExternalValue, Prepared, check_itr, prepare
from bucketsnap._snapshot import Snapshot
from bucketsnap._storage import DEFAULT_PART_SIZE, DEFAULT_UPLOAD_CONCURRENCY, Storage
from bucketsnap._transport import Retry
from bucketsnap.retention import RetentionPolicy

if TYPE_CHECKING:  # both import torch, which only saves and loads need (the CLI's ls, gc, cp do not)
    from bucketsnap._values import MapLocation
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
        upload_concurrency: parts of one save uploaded at once to S3, GCS or Azure; a save holds at most
            ``(upload_concurrency + 1) * part_size`` bytes of upload buffers; on S3 and Azure, a save of tensors
            and arrays at most 48 MiB more above the data (measured up to 10 GiB: docs/performance.md, "Bounded
            memory"). On GCS, 1 uses gcsfs's resumable upload instead of a parallel composite upload (see
            docs/backends.md).
        retry: the :class:`~bucketsnap.Retry` policy for transient failures of remote stores (throttling, 5xx,
            dropped connections): by default 5 tries with capped exponential backoff.
        max_member_size: the most bytes one member may declare decompressed before a load or verify refuses it
            unread (a zip bomb, or a lie); None: 64 GiB. Raise it only for runs you trust.
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
        retry: Retry | None = None,
        max_member_size: int | None = None,
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
            retry=retry,
            single_writer=single_writer,
        )
        self.max_member_size = max_member_size
        self._log = ManifestLog(self._storage)
        if retention is not None and not isinstance(retention, RetentionPolicy):
            raise TypeError(f"retention must be a bucketsnap.retention policy such as KeepLast(3), not {retention!r}")
        self._commits = Committer(self._storage, self._log, retention=retention)
        self._pipeline = SavePipeline(
            self._commits, compression_level=compression_level, compression_threads=compression_threads
        )
        self.max_in_flight = max_in_flight
        self._background.where = self.url

    @property
    def url(self) -> str:
        """The run's URL, credentials redacted."""
        return self._storage.url

    @property
    def storage(self) -> Storage:
        """The storage layer this store writes through."""
        return self._storage

    @property
    def compression_level(self) -> int:
        """The zstd level of the members written from now on."""
        return self._pipeline.compression_level

    @compression_level.setter
    def compression_level(self, level: int) -> None:
        self._pipeline.compression_level = level

    @property
    def compression_threads(self) -> int:
        """zstd worker threads per member written from now on."""
        return self._pipeline.compression_threads

    @compression_threads.setter
    def compression_threads(self, threads: int) -> None:
        self._pipeline.compression_threads = threads

    @property
    def retention(self) -> RetentionPolicy | None:
        """The retention policy applied after each commit from now on (None: keep everything)."""
        return self._commits.retention

    @retention.setter
    def retention(self, policy: RetentionPolicy | None) -> None:
        self._commits.retention = policy

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
        the uncompressed bytes written so far (see :mod:`bucketsnap._progress`).

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
        from bucketsnap._distributed_save import save_job

        self._raise_background_error()
        job = save_job(
            self._pipeline, itr, state, metrics, overwrite=overwrite, process_group=process_group, progress=progress
        )
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
        from bucketsnap._distributed_save import save_job

        self._raise_background_error()
        lease = self._host_copies.lease()
        try:
            job = save_job(
                self._pipeline,
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

    def cancel_queued(self) -> int:
        """Cancel the :meth:`save_async` calls that have not started yet; return how many were cancelled.

        Their futures raise ``CancelledError``; saves already running go on. :mod:`bucketsnap._preemption` calls
        it when the saves in flight outlast their share of the deadline.
        """
        return self._background.cancel_queued()

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
        """Plan, write and commit a save of this process alone (every save without a process group or
        ``Sharded`` values goes through here; tests wrap it)."""
        return self._pipeline.save(prepared, progress)

    def _stage(self, prepared: Prepared, progress: ProgressCallback | None = None) -> Staged:
        """The plan and write steps of :meth:`_write`, committing nothing (for tests that interleave gc)."""
        return self._pipeline.stage(prepared, progress)

    def _commit_new(self, info: SnapshotInfo, base: Manifest, *, overwrite: bool, written: list[str]) -> Manifest:
        """The commit step of a save staged after reading ``base`` (see :meth:`Committer.commit`)."""
        return self._commits.commit(info, base, overwrite=overwrite, written=written)

    def _apply_retention(self, committed: Manifest) -> None:
        """Apply :attr:`retention` after ``committed`` (see :meth:`Committer.apply_retention`)."""
        self._commits.apply_retention(committed)

    def delete(self, itr: int) -> None:
        """Uncommit snapshot ``itr`` and delete its archive; the chunks it shared by content go with :meth:`gc`.

        The generation that drops it records the archive as a sweep before it is deleted, so that a save that
        found the archive needed a moment ago sees the deletion when it commits (docs/protocol.md).

        Raises:
            SnapshotNotFoundError: no snapshot ``itr`` is committed.
        """
        self._commits.delete(check_itr(itr))

    # -- reading -------------------------------------------------------------------------------------------

    def itrs(self) -> list[int]:
        """The committed itrs, ascending."""
        return self._log.lookup(lambda m: m.itrs())

    def infos(self) -> list[SnapshotInfo]:
        """Every committed snapshot's info, ascending by itr."""
        return self._log.lookup(lambda m: list(m.snapshots))

    def info(self, which: Which = "last") -> SnapshotInfo:
        """The info of snapshot ``which``: ``"last"``, ``"first"`` or an int itr.

        Raises:
            SnapshotNotFoundError: the run is empty or has no such itr.
            ValueError: ``which`` is none of those.
        """
        return self._log.lookup(lambda m: m.resolve(which, self.url))

    def open(self, which: Which = "last", *, map_location: MapLocation = None, allow_pickle: bool = False) -> Snapshot:
        """A lazy view of snapshot ``which``: members are read only when indexed."""
        return Snapshot(
            self._storage,
            self.info(which),
            map_location=map_location,
            allow_pickle=allow_pickle,
            max_member_size=self.max_member_size,
        )

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
        return self._commits.copy(src.storage, src.info(which), overwrite=overwrite, progress=progress)

    # -- maintenance ---------------------------------------------------------------------------------------

    def gc(self, *, min_age: float = 3600.0, dry_run: bool = False) -> list[str]:
        """Delete what no committed snapshot needs; return the removed paths (relative to the run).

        Condemns, in a commit, every object under ``snapshots/`` and ``chunks/`` that no committed snapshot
        needs (orphans of crashed or failed saves, snapshots dropped by retention, saves still in flight), then
        deletes, after another commit, those that an earlier call condemned at least ``min_age`` seconds ago
        (by this process's clock) and that are still unreferenced; also manifest generations older than the
        newest :data:`~bucketsnap._manifest.KEEP_GENERATIONS`. Deletions are ordered against commits through the
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

    def repair(self, *, from_archives: bool = False) -> Manifest:
        """Commit a new manifest generation rebuilt after a corrupt one; on a healthy run, change nothing.

        When the newest generation does not read (or a page it references does not), starts from the newest
        generation that does, and adds every intact archive under ``snapshots/`` it does not list (read from the
        archive's own ``meta.json``). Use it when a load reports a corrupt manifest; it never deletes anything.
        On a healthy run it commits nothing and returns the newest generation: an archive that generation does
        not list was dropped by retention, deleted, or never committed, and stays invisible.

        A run with archives but no generation at all is an empty run whose first save is in flight or was
        killed, or a run whose manifest was lost (``manifest/`` deleted, ``snapshots/`` copied alone): with
        ``from_archives=True`` its manifest is rebuilt from its archives (an archive of a first save in flight
        or killed comes back too); by default it is left as it is.
        """
        return repair(self._log, from_archives=from_archives)


def as_store(url_or_store: str | SnapshotStore, *, storage_options: dict[str, Any] | None = None) -> SnapshotStore:
    """``url_or_store`` itself if it is a store, else a new :class:`SnapshotStore` at that URL."""
    if isinstance(url_or_store, SnapshotStore):
        if storage_options:
            raise ValueError("storage_options apply to a URL; this is already a SnapshotStore")
        return url_or_store
    return SnapshotStore(url_or_store, storage_options=storage_options)
