"""The changes a writer makes to a run's manifest log: commit a new snapshot, prune by retention, copy, delete.

The commit step of every save (:mod:`bucketsnap._pipeline`), of :meth:`SnapshotStore.copy_from
<bucketsnap.SnapshotStore.copy_from>`, and deletions, as docs/protocol.md ("Saving", steps 3 to 7) describes
them. Each is one :meth:`ManifestLog.commit_state <bucketsnap._manifest.ManifestLog.commit_state>` whose change
checks the newest generation again on every retry.

* **The fence.** A save reads its *base* generation before it writes anything (:meth:`Committer.base`), and
  its commit is refused if a sweep recorded since may have deleted an object it needs
  (:func:`~bucketsnap._manifest.check_not_swept`). Deletions (``delete``, overwrites) record what they remove
  as a sweep in the generation that drops it, so that a commit built on an older base sees them.
* **Cleanup.** A commit refused for sure (the itr exists, the fence) deletes the save's archives. One whose
  outcome is unknown (an error from the create, and no re-read shows it) leaves them to gc, because deleting
  them could break a commit that landed. A commit known to have landed is reported as committed, whatever
  fails after it (failed deletes and a failed retention prune are warnings).

The trade-off: the exists check runs twice, at the base (before any byte is written, so that a refused save
costs one read) and in the commit (the truth, since another writer may commit the itr meanwhile).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from bucketsnap._copying import copy_objects
from bucketsnap._info import SnapshotInfo
from bucketsnap._manifest import Manifest, ManifestLog, check_not_swept
from bucketsnap._progress import ProgressCallback
from bucketsnap._storage import Storage
from bucketsnap.errors import BucketsnapError, SnapshotExistsError, StorageError
from bucketsnap.retention import RetentionPolicy, _dropped_itrs, split

__all__ = ["Committer", "exists_error"]

logger = logging.getLogger("bucketsnap")


class Committer:
    """Commits, prunes, copies and deletes snapshots of one run through its manifest log.

    Args:
        storage: the run's storage.
        log: the run's manifest log (shared with the store's readers, and its conflict count).
        retention: applied after each commit of a new snapshot (None: keep everything).
    """

    def __init__(self, storage: Storage, log: ManifestLog, *, retention: RetentionPolicy | None) -> None:
        self.storage = storage
        self.log = log
        self.retention = retention

    @property
    def url(self) -> str:
        return self.storage.url

    def base(self, itr: int, *, overwrite: bool) -> Manifest:
        """The newest generation, read before a save writes anything (its base), if ``itr`` may be saved.

        Raises:
            SnapshotExistsError: ``itr`` is committed and ``overwrite`` is False.
        """
        base = self.log.read()  # what gc may have swept since is told from it (the fence of commit())
        if not overwrite and base.find(itr) is not None:
            raise exists_error(itr, self.url)
        return base

    def commit(self, info: SnapshotInfo, base: Manifest, *, overwrite: bool, written: list[str]) -> Manifest:
        """Commit ``info``, whose objects were written, or found referenced by ``base``, after reading ``base``.

        Fenced against gc: the commit fails with StorageError if a sweep since ``base`` may have deleted an
        object it needs. Once the commit has landed nothing deletes its objects, and it is reported as
        committed: cleanup that fails afterwards is a warning. ``written`` (this save's archives) are deleted
        only when this save's own check refused the commit; when its outcome is unknown they are left to gc.
        The archive of a snapshot an overwrite replaces is deleted through a sweep recorded by the commit (see
        :meth:`delete`).
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
                    raise exists_error(info.itr, self.url)
                check_not_swept(base, current, info.objects(), self.url)
            except BucketsnapError as exc:
                refused.append(exc)
                raise
            new = current.with_entry(info)
            if old is not None:  # only an overwrite reads every page (is the old archive needed elsewhere?)
                doomed.update(_archives_to_delete([old], new))
            return new.with_sweep(doomed)

        try:
            committed = self.log.commit_state(add)
        except BaseException as exc:
            if refused:  # refused by its own check: no generation references them
                self.delete_quietly(written)
                raise
            # A lost response (or a conflict after one) can hide a create that succeeded: look before reporting.
            try:
                current: Manifest | None = self.log.read()
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
        self.apply_retention(committed)
        return committed

    def apply_retention(self, committed: Manifest) -> None:
        """Commit a generation without the snapshots ``retention`` drops; leave their objects to gc.

        Only the manifest changes, after the new snapshot is committed, so a run never lacks a loadable
        snapshot, and a reader that resolved a dropped snapshot a moment ago can finish reading it. A failed
        prune is logged, not raised (the save itself is committed), and redone by the next commit.
        """
        policy = self.retention
        if policy is None:
            return
        dropped: list[int] = []
        by_itrs = _dropped_itrs(policy, committed.itrs())
        if by_itrs is not None:
            # A policy of itrs alone: decided from the itrs (the pages above level 1), each dropped entry removed
            # along its path, so that no page of entries is read.
            if not by_itrs:
                return

            def prune_itrs(current: Manifest) -> Manifest:
                dropped[:] = _dropped_itrs(policy, current.itrs()) or []
                for itr in dropped:
                    current = current.without(itr)
                return current

            change: Callable[[Manifest], Manifest] = prune_itrs
        else:
            if not split(policy, committed.snapshots)[1]:
                return

            def prune(current: Manifest) -> Manifest:
                kept, gone = split(policy, current.snapshots)
                dropped[:] = [s.itr for s in gone]
                return current.with_snapshots(kept)

            change = prune

        try:
            self.log.commit_state(change)
        except Exception as exc:  # the save is committed: a failed prune must not turn it into a failure
            logger.warning("could not apply %r to %s; the next commit retries: %s", policy, self.url, exc)
            return
        logger.info("retention %r dropped itrs %s from %s", policy, dropped, self.url)

    def copy(
        self, source: Storage, info: SnapshotInfo, *, overwrite: bool, progress: ProgressCallback | None = None
    ) -> SnapshotInfo:
        """Copy committed snapshot ``info`` of the run at ``source`` into this run: a save whose write step
        streams the source's objects (see :mod:`bucketsnap._copying`)."""
        base = self.base(info.itr, overwrite=overwrite)
        deleting = {rel for sweep in base.sweeps for rel in sweep.deleting} - base.referenced()
        if deleting & set(info.refs):
            raise StorageError(
                f"not copied to {self.url}: the snapshot shares {sorted(deleting & set(info.refs))[0]}, which a gc of "
                "this run has committed to delete (it was dropped here before), so a copy of it could be lost to that "
                "gc. Nothing was copied; copy into another run, or retry once gc has run a few more times here."
            )
        copied, written = copy_objects(source, info, self.storage, progress=progress)
        self.commit(copied, base, overwrite=overwrite, written=list(written))
        logger.info("copied itr %d from %s to %s (%d bytes)", info.itr, source.url, self.url, copied.size)
        return copied

    def delete(self, itr: int) -> None:
        """Uncommit snapshot ``itr``, recording its archive as a sweep of the generation that drops it, then
        delete the archive (see :meth:`SnapshotStore.delete <bucketsnap.SnapshotStore.delete>`)."""
        doomed: set[str] = set()
        found: list[SnapshotInfo] = []

        def remove(current: Manifest) -> Manifest:
            if found and current.find(itr) is None:
                # Found on an earlier attempt, gone now: our create landed although it reported a conflict (a
                # lost response, retried), or another writer deleted it. Either way it is deleted.
                return current
            found[:] = [current.resolve(itr, self.url)]
            kept = current.without(itr)
            doomed.clear()
            doomed.update(_archives_to_delete(found, kept))
            return kept.with_sweep(doomed)

        committed = self.log.commit_state(remove)
        self._delete_swept(doomed, committed, f"itr {itr} is deleted from the manifest")

    def delete_quietly(self, paths: Iterable[str]) -> None:
        """Delete objects no generation references; a failure is a warning (gc removes them later)."""
        for rel in paths:
            try:
                self.storage.delete(rel)
            except BucketsnapError as exc:
                logger.warning("could not delete %s after a failed save: %s", self.storage.url_of(rel), exc)

    def _delete_swept(self, doomed: set[str], committed: Manifest, done: str) -> None:
        """Delete the objects of ``doomed`` that a sweep recorded in ``committed`` deletes; a failure is a
        warning (the objects are unreferenced: gc condemns and removes them later)."""
        recorded = {rel for sweep in committed.sweeps for rel in sweep.deleting}
        for rel in sorted(doomed & recorded):
            try:
                self.storage.delete(rel)
            except BucketsnapError as exc:
                logger.warning("%s at %s, but deleting %s failed (gc() removes it): %s", done, self.url, rel, exc)


def exists_error(itr: int, url: str) -> SnapshotExistsError:
    return SnapshotExistsError(
        f"itr {itr} is already committed at {url}; pass overwrite=True to replace it, or save a new itr"
    )


def _archives_to_delete(dropped: list[SnapshotInfo], kept: Manifest) -> set[str]:
    """The archives of ``dropped`` snapshots that no snapshot of ``kept`` needs.

    Objects shared by content (``refs``: replay-buffer chunks) are left to gc, which condemns them first.
    """
    return {rel for s in dropped for rel in s.objects() if rel not in s.refs} - kept.referenced()
