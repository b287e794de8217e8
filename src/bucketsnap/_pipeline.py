"""The save pipeline: plan, write, commit. It is the same for a process saving alone and for every rank of a
distributed save.

Layering: :mod:`bucketsnap._store` drives it; it uses :mod:`bucketsnap._saving` (encode, write an archive),
:mod:`bucketsnap._commit` (the commit) and :mod:`bucketsnap._manifest` (names, the base). It knows nothing of
``torch.distributed``: ``bucketsnap._distributed_save`` supplies the world of a process group.

A save runs in a :class:`World`, the processes that take part in it and the three collectives between them.
A process saving alone is :data:`ALONE`, a world of one (rank 0 of 1) whose collectives hand back what they
are given, the way torchsnapshot's ``PGWrapper(None)`` works. The ranks of a ``torch.distributed`` group are
another world (``bucketsnap._distributed_save``). Every save takes the same steps (docs/protocol.md, "Saving"):

1. **plan.** Each rank says what it saves (itr, keys, replicated sizes) or reports the error it met preparing
   it. Rank 0 reads the base generation before anything is written, refuses an itr that is already committed
   (unless ``overwrite``), and draws the save's token and creation time. ``all_gather``: every rank goes on,
   or every rank raises the same error.
2. **write.** Each rank writes its members to its own archive, named after the token
   (:func:`~bucketsnap._manifest.archive_path`). It may reuse only objects the base references
   (:class:`~bucketsnap._saving.StoredObjects`).
3. **gather.** Rank 0 collects every rank's member table, or its error.
4. **commit.** Rank 0 builds the snapshot's entry and commits it on top of the newest generation
   (:meth:`Committer.commit <bucketsnap._commit.Committer.commit>`, fenced against gc by the base).
5. **outcome.** ``broadcast``: every rank returns the same info or raises the same error.

Who deletes what when a step fails: before the commit, each rank deletes the archive it wrote. Once a commit
has been attempted, only a commit that was refused for sure deletes them (rank 0 deletes all of them,
in :mod:`bucketsnap._commit`). A commit whose outcome is unknown leaves them to gc, because deleting them
could break a commit that did land.
A world whose collectives can fail (a rank died) says so through :meth:`World.lost`. A rank that loses the
group after writing returns the snapshot if rank 0 committed it anyway.

The trade-off: a process alone pays for a few dicts and identity "collectives" per save (no request more
than a dedicated path would make). In exchange there is one definition of the order of the requests, of the
names, of the itr check and of the commit's fence.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any, Protocol

from bucketsnap._chunk_names import CHUNK_DIR
from bucketsnap._commit import Committer
from bucketsnap._info import MemberInfo, SnapshotInfo
from bucketsnap._manifest import Manifest, archive_path, new_token, rank_token
from bucketsnap._progress import ProgressCallback
from bucketsnap._saving import Prepared, StoredObjects, meta, write_archive
from bucketsnap.errors import BucketsnapError

__all__ = ["ALONE", "Failure", "SavePipeline", "Staged", "World"]

logger = logging.getLogger("bucketsnap")


@dataclass(frozen=True)
class Failure:
    """An error that one rank of a save met, in the form in which every rank hears of it.

    Attributes:
        rank: the rank that failed.
        kind: the exception's type name, and ``message`` its text (for an error that cannot be rebuilt).
        payload: the exception itself, serialized by the world that carries it to the other ranks.
        committing: raised by rank 0's commit attempt. The commit may have landed, so no rank deletes its
            archive (gc removes them if it did not).
    """

    rank: int
    kind: str
    message: str
    payload: bytes | None = None
    committing: bool = False


class World(Protocol):
    """The processes that take part in one save, and the collectives between them."""

    @property
    def rank(self) -> int: ...

    @property
    def size(self) -> int: ...

    @property
    def ranked(self) -> bool:
        """Whether the save is collective: each rank names its objects after its rank, and errors are carried
        to every rank (a process saving ``Sharded`` values alone is a ranked world of one)."""
        ...

    def all_gather(self, obj: Any) -> list[Any]: ...

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, by rank, on rank 0; an empty list elsewhere."""
        ...

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj``, on every rank."""
        ...

    def failure(self, exc: BaseException) -> Failure:
        """``exc``, met on this rank, as the other ranks will hear of it."""
        ...

    def error(self, failure: Failure, own: BaseException | None) -> BaseException:
        """The error this rank raises for ``failure``: ``own`` if this rank failed itself, else a copy."""
        ...

    def check(self, plans: list[dict[str, Any]], url: str) -> Failure | None:
        """The first failure among the gathered plans, or one for ranks that do not save the same thing."""
        ...

    def lost(self, step: str, exc: Exception, url: str, stray: str | None) -> BaseException:
        """The error for a collective that failed while ``step``. ``stray`` is the URL of an archive this rank
        wrote that rank 0 may still commit (None: nothing of the save can have been committed)."""
        ...


class _Alone:
    """A process saving alone: rank 0 of a world of one. Its collectives return what they are given, and its
    errors never travel, so each is raised as it was met."""

    rank = 0
    size = 1
    ranked = False

    def all_gather(self, obj: Any) -> list[Any]:
        return [obj]

    def gather(self, obj: Any) -> list[Any]:
        return [obj]

    def broadcast(self, obj: Any) -> Any:
        return obj

    def failure(self, exc: BaseException) -> Failure:
        return Failure(0, type(exc).__name__, str(exc))

    def error(self, failure: Failure, own: BaseException | None) -> BaseException:
        return own if own is not None else BucketsnapError(f"{failure.kind}: {failure.message}")

    def check(self, plans: list[dict[str, Any]], url: str) -> Failure | None:
        failure: Failure | None = plans[0].get("failure")
        return failure

    def lost(self, step: str, exc: Exception, url: str, stray: str | None) -> BaseException:
        return exc  # no collective of a world of one fails


#: The world of a process saving alone.
ALONE: World = _Alone()


@dataclass(frozen=True)
class Staged:
    """A save whose objects are written but not committed, and the generation read before they were."""

    info: SnapshotInfo
    base: Manifest


class SavePipeline:
    """Saves into one run: the steps of the module docstring, on any :class:`World`.

    Args:
        commits: the run's committer, which makes step 4's commit and step 1's base read.
        compression_level: as :class:`~bucketsnap.SnapshotStore` takes it, read at each write.
        compression_threads: as :class:`~bucketsnap.SnapshotStore` takes it, read at each write.
    """

    def __init__(self, commits: Committer, *, compression_level: int, compression_threads: int) -> None:
        self.commits = commits
        self.storage = commits.storage
        self.compression_level = compression_level
        self.compression_threads = compression_threads

    @property
    def url(self) -> str:
        return self.storage.url

    # -- saving --------------------------------------------------------------------------------------------

    def save(
        self, prepared: Prepared | BaseException, progress: ProgressCallback | None = None, world: World = ALONE
    ) -> SnapshotInfo:
        """Plan, write and commit a snapshot, on this rank of ``world`` (every rank calls it).

        ``prepared`` is this rank's share of the save, or the error this rank met preparing it. That error
        is raised by every rank, at the plan, before anything is written.
        """
        run = _Run(self, world, prepared)
        prepared = run.plan()
        report = run.write(prepared, progress)
        reports = run.gather(report)
        if isinstance(reports, SnapshotInfo):  # the group was lost, but rank 0 committed all the same
            return reports
        outcome = run.commit(prepared, reports) if world.rank == 0 else None
        return run.conclude(outcome, written="size" in report)

    def stage(self, prepared: Prepared, progress: ProgressCallback | None = None) -> Staged:
        """Steps 1 and 2 of a save alone, with nothing committed (for tests that interleave saves with gc)."""
        run = _Run(self, ALONE, prepared)
        prepared = run.plan()
        report = run.write(prepared, progress)
        if "failure" in report:
            raise ALONE.error(report["failure"], run.own)
        return Staged(run.info(prepared, [report]), run.base)


class _Run:
    """One save on one rank of its world: what each step learns, for the steps after it."""

    def __init__(self, pipeline: SavePipeline, world: World, prepared: Prepared | BaseException) -> None:
        self.pipeline = pipeline
        self.world = world
        self.prepared = prepared
        #: The error this rank met, raised as it is if the save fails because of it.
        self.own: BaseException | None = prepared if isinstance(prepared, BaseException) else None
        self.base = Manifest(0)  # rank 0: the generation read before any rank writes; the commit is fenced by it
        self.leader: dict[str, Any] = {}  # rank 0's plan: token, creation time, reusable objects
        self.path = ""  # this rank's archive

    @property
    def url(self) -> str:
        return self.pipeline.url

    def plan(self) -> Prepared:
        """Step 1; raises on every rank if some rank failed to prepare or to plan, or the ranks disagree."""
        world, prepared = self.world, self.prepared
        mine: dict[str, Any]
        if isinstance(prepared, BaseException):
            mine = {"failure": world.failure(prepared)}
        else:
            mine = {"itr": prepared.itr, "layout": prepared.layout, "sizes": prepared.sizes}
            if world.rank == 0:
                try:
                    self.base = self.pipeline.commits.base(prepared.itr, overwrite=prepared.overwrite)
                    mine.update(
                        token=new_token(), created=datetime.now(timezone.utc), reusable=_reusable(self.base, world)
                    )
                except Exception as exc:
                    self.own = exc
                    mine = {"failure": world.failure(exc)}
        try:
            plans = world.all_gather(mine)
        except Exception as exc:
            raise world.lost("planning", exc, self.url, None) from exc
        failure = world.check(plans, self.url)
        if failure is not None:
            raise world.error(failure, self.own)
        assert isinstance(prepared, Prepared)
        self.leader = plans[0]
        self.path = archive_path(prepared.itr, self.leader["token"], world.rank if world.ranked else None)
        return prepared

    def write(self, prepared: Prepared, progress: ProgressCallback | None) -> dict[str, Any]:
        """Step 2: this rank's members to its archive; what the commit needs of it, or the error met.

        A rank other than 0 with nothing to write writes nothing (rank 0's archive is the snapshot's own)."""
        world, pipeline = self.world, self.pipeline
        if not prepared.values and world.rank != 0:
            return {"members": {}, "refs": []}
        token = self.leader["token"]
        objects = StoredObjects(self.leader["reusable"], rank_token(token, world.rank) if world.ranked else token)
        archive_meta = meta(prepared.itr, self.leader["created"], prepared.metrics)
        if world.ranked:
            archive_meta.update(rank=world.rank, world_size=world.size)
        try:
            written = write_archive(
                pipeline.storage,
                self.path,
                prepared.values,
                archive_meta,
                level=pipeline.compression_level,
                threads=pipeline.compression_threads,
                objects=objects,
                progress=progress,
            )
        except Exception as exc:
            self.own = exc
            return {"failure": world.failure(exc)}
        return {
            "path": self.path,
            "size": written.size,
            "checksum": written.checksum,
            "members": written.members,
            "refs": list(written.refs),
        }

    def gather(self, report: dict[str, Any]) -> list[dict[str, Any]] | SnapshotInfo:
        """Step 3: every rank's report on rank 0 ([] elsewhere); the snapshot, if the group was lost but rank 0
        committed it anyway."""
        try:
            return self.world.gather(report)
        except Exception as exc:
            if self.world.rank == 0 and "size" in report:  # rank 0 commits only after the gather: nothing was
                self.pipeline.commits.delete_quietly([self.path])  # committed
            found = self._committed_anyway()
            if found is not None:
                return found
            raise self.world.lost("gathering", exc, self.url, self._stray()) from exc

    def info(self, prepared: Prepared, reports: list[dict[str, Any]]) -> SnapshotInfo:
        """The manifest entry of every rank's members: rank 0's archive is the snapshot's own, each member of
        another rank's names the archive that holds it."""
        members: dict[str, MemberInfo] = {}
        for rank, report in enumerate(reports):
            for name, member in report["members"].items():
                members[name] = member if rank == 0 else replace(member, path=report["path"])
        names = prepared.names or tuple(members)
        own = reports[0]
        return SnapshotInfo(
            itr=prepared.itr,
            path=own["path"],
            url=self.pipeline.storage.url_of(own["path"]),
            size=own["size"],
            created=self.leader["created"],
            metrics=prepared.metrics,
            members={name: members[name] for name in names},
            refs=tuple(sorted({ref for report in reports for ref in report["refs"]})),
            checksums={r["path"]: r["checksum"] for r in reports if "path" in r},
        )

    def commit(self, prepared: Prepared, reports: list[dict[str, Any]]) -> SnapshotInfo | Failure:
        """Step 4, on rank 0: commit every rank's members as one snapshot, or say why not.

        If a rank failed, rank 0 deletes its own archive and each other rank its own (in :meth:`conclude`). A
        commit that fails is marked ``committing``: :meth:`SavePipeline.commit` already deleted every rank's
        archive if it was refused for sure, and left them to gc if it may have landed.
        """
        failures = [r["failure"] for r in reports if "failure" in r]
        if failures:
            if "path" in reports[0]:
                self.pipeline.commits.delete_quietly([reports[0]["path"]])
            failure: Failure = failures[0]
            return failure
        info = self.info(prepared, reports)
        written = [r["path"] for r in reports if "path" in r]
        try:
            self.pipeline.commits.commit(info, self.base, overwrite=prepared.overwrite, written=written)
        except Exception as exc:
            self.own = exc
            return replace(self.world.failure(exc), committing=True)
        total = sum(r.get("size", 0) for r in reports)
        logger.info("committed itr %d to %s (%d bytes in %d archive(s))", info.itr, self.url, total, len(written))
        return info

    def conclude(self, outcome: SnapshotInfo | Failure | None, *, written: bool) -> SnapshotInfo:
        """Step 5: every rank hears rank 0's outcome, and returns the snapshot or raises the error."""
        world = self.world
        try:
            outcome = world.broadcast(outcome)
        except Exception as exc:
            if isinstance(outcome, SnapshotInfo):  # rank 0 knows it committed
                logger.warning("itr %d committed to %s, but not every rank heard so: %s", outcome.itr, self.url, exc)
                return outcome
            if world.rank == 0:
                assert isinstance(outcome, Failure)
                raise world.error(outcome, self.own) from None
            found = self._committed_anyway()
            if found is not None:
                return found
            raise world.lost("hearing the outcome", exc, self.url, self._stray()) from exc
        if isinstance(outcome, SnapshotInfo):
            return outcome
        assert isinstance(outcome, Failure)
        if written and world.rank != 0 and not outcome.committing:  # rank 0 already deleted its own
            self.pipeline.commits.delete_quietly([self.path])
        raise world.error(outcome, self.own)

    def _committed_anyway(self) -> SnapshotInfo | None:
        """After losing the group past the plan: the snapshot, if rank 0 committed it all the same."""
        if self.world.rank == 0:
            return None  # rank 0 commits only after the gather, and knows whether it did
        itr = self.leader["itr"]
        with contextlib.suppress(Exception):
            committed = self.pipeline.commits.log.read().find(itr)
            if committed is not None and committed.path == archive_path(itr, self.leader["token"], 0):
                logger.warning("rank %d lost the group, but itr %d was committed to %s", self.world.rank, itr, self.url)
                return committed
        return None

    def _stray(self) -> str | None:
        """This rank's archive, which rank 0 may still commit (None on rank 0, which commits after the gather)."""
        return None if self.world.rank == 0 else self.pipeline.storage.url_of(self.path)


def _reusable(base: Manifest, world: World) -> frozenset[str]:
    """The objects of ``base`` a save may reuse. A ranked world sends them to every rank, so only the chunks:
    the only objects a save reuses (see :class:`~bucketsnap._saving.StoredObjects`)."""
    referenced = base.shared()  # only chunks are reused; reading them needs no page without one
    if world.ranked:
        return frozenset(rel for rel in referenced if rel.startswith(f"{CHUNK_DIR}/"))
    return frozenset(referenced)
