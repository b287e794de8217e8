"""The protocol of a distributed save, as :mod:`bucketsnap.distributed` describes it (plan, write, gather,
commit, outcome); :meth:`SnapshotStore.save` and ``save_async`` call :func:`save_job`.

Kept apart from the public helpers so that each module stays small: this one knows the order of the
collectives and who deletes what when a rank fails.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from bucketsnap._saving import ExternalValue, StoredObjects, check_itr, check_state, prepare_value, write_archive
from bucketsnap._saving import meta as archive_meta
from bucketsnap.chunks import CHUNK_DIR
from bucketsnap.distributed import DistributedSaveError, ProcessGroupArg, Sharded, _Group, _resolve, shard_key
from bucketsnap.errors import BucketsnapError
from bucketsnap.info import MemberInfo, SnapshotInfo, check_metrics
from bucketsnap.manifest import SNAPSHOT_DIR, Manifest
from bucketsnap.progress import ProgressCallback
from bucketsnap.values import EncodedValue, HostBuffer

if TYPE_CHECKING:
    from bucketsnap.store import SnapshotStore

__all__ = ["save_job"]

logger = logging.getLogger("bucketsnap")


# -- one rank's share of a save ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Local:
    """This rank's validated, encoded part of a save."""

    itr: int
    overwrite: bool
    metrics: dict[str, Any]
    layout: list[tuple[str, bool]]  # (key, sharded), in the caller's order
    sizes: dict[str, int]  # replicated key -> tensor/array bytes, to check and spread replicated keys
    values: dict[str, EncodedValue | ExternalValue]  # the members this rank writes


def _prepare_local(
    group: _Group,
    itr: Any,
    state: Any,
    metrics: Mapping[str, Any] | None,
    *,
    overwrite: bool,
    copy: bool,
    host_buffer: HostBuffer | None,
) -> _Local:
    itr = check_itr(itr)
    check_state(state)
    metric_values = check_metrics(dict(metrics or {}))
    sizes = {k: _nbytes(v) for k, v in state.items() if not isinstance(v, Sharded)}
    owners = _assign(sizes, group.world)
    values: dict[str, EncodedValue | ExternalValue] = {}
    for key, value in state.items():
        if isinstance(value, Sharded):
            values[shard_key(key, group.rank)] = prepare_value(value.value, copy=copy, host_buffer=host_buffer)
        elif owners[key] == group.rank:
            values[key] = prepare_value(value, copy=copy, host_buffer=host_buffer)
    layout = [(k, isinstance(v, Sharded)) for k, v in state.items()]
    return _Local(itr, overwrite, metric_values, layout, sizes, values)


def _nbytes(value: Any) -> int:
    """Tensor and array bytes in ``value``: cheap, and the same on every rank for a replicated value."""
    if isinstance(value, torch.Tensor):
        return int(value.numel() * value.element_size())
    if isinstance(value, (np.ndarray, np.generic, bytes)):
        return int(value.nbytes) if not isinstance(value, bytes) else len(value)
    if isinstance(value, Mapping):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def _assign(sizes: Mapping[str, int], world: int) -> dict[str, int]:
    """Replicated key -> the rank that writes it: largest first, each to the least loaded rank."""
    load = [0] * world
    owners: dict[str, int] = {}
    for key in sorted(sizes, key=lambda k: (-sizes[k], k)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[key] = rank
        load[rank] += sizes[key]
    return owners


@dataclass(frozen=True)
class _Failure:
    """An error met on one rank, in a form every rank can raise."""

    rank: int
    kind: str
    message: str
    pickled: bytes | None
    #: Raised by rank 0's commit: it may have landed, so no rank deletes its archive (gc removes it if not).
    committing: bool = False

    @classmethod
    def of(cls, rank: int, exc: BaseException) -> _Failure:
        try:
            data = pickle.dumps(exc)
            pickle.loads(data)  # some exceptions pickle but cannot be rebuilt
        except Exception:
            return cls(rank, type(exc).__name__, str(exc), None)
        return cls(rank, type(exc).__name__, str(exc), data)

    def exception(self, group: _Group, own: BaseException | None) -> BaseException:
        """The error this rank raises: its own if it failed itself, else a copy of the failing rank's."""
        if own is not None and self.rank == group.rank:
            return own
        exc: BaseException | None = None
        pickled = self.pickled
        if pickled is not None:
            with contextlib.suppress(Exception):
                exc = pickle.loads(pickled)
        if not isinstance(exc, BaseException):
            exc = DistributedSaveError(f"rank {self.rank} of {group.world} failed: {self.kind}: {self.message}")
        if hasattr(exc, "add_note"):
            exc.add_note(f"raised on rank {self.rank} of {group.world} during a distributed save")
        return exc


# -- the protocol ------------------------------------------------------------------------------------------------


def save_job(
    store: SnapshotStore,
    itr: Any,
    state: Any,
    metrics: Mapping[str, Any] | None,
    *,
    overwrite: bool,
    process_group: ProcessGroupArg,
    progress: ProgressCallback | None = None,
    copy: bool = False,
    host_buffer: HostBuffer | None = None,
) -> Callable[[], SnapshotInfo] | None:
    """A distributed save, prepared in the caller's thread, or None when the plain single-process save applies.

    The returned callable runs the collectives and the write (in the caller's thread for ``save``, in the
    background for ``save_async``). Errors met while preparing are not raised here: the other ranks must
    hear about them, so they are raised by the callable, on every rank. ``copy`` and ``host_buffer`` are as
    in :func:`bucketsnap.values.encode`; buffers taken from ``host_buffer`` are read until the callable returns.
    """
    group = _resolve(process_group)
    sharded = isinstance(state, Mapping) and any(isinstance(v, Sharded) for v in state.values())
    if group.pg is None and not sharded:
        return None
    prepared: _Local | BaseException
    try:
        prepared = _prepare_local(group, itr, state, metrics, overwrite=overwrite, copy=copy, host_buffer=host_buffer)
    except Exception as exc:
        prepared = exc
    ticket = group.sequencer.take()

    def job() -> SnapshotInfo:
        with group.sequencer.turn(ticket):
            return _run(store, group, prepared, progress)

    return job


def _run(
    store: SnapshotStore, group: _Group, prepared: _Local | BaseException, progress: ProgressCallback | None
) -> SnapshotInfo:
    own = prepared if isinstance(prepared, BaseException) else None
    plan: dict[str, Any]
    base = Manifest(0)  # rank 0: the generation read before any rank writes, that the commit is checked against
    if isinstance(prepared, BaseException):
        plan = {"failure": _Failure.of(group.rank, prepared)}
    else:
        plan = {"itr": prepared.itr, "layout": prepared.layout, "sizes": prepared.sizes}
        if group.rank == 0:
            plan.update(token=uuid.uuid4().hex[:16], created=datetime.now(timezone.utc))
            try:
                base = store._log.read()
                if not prepared.overwrite and base.find(prepared.itr) is not None:
                    raise store._exists(prepared.itr)
                # Chunks the ranks may reuse: only those a committed snapshot refers to (see StoredObjects).
                plan["committed"] = sorted(rel for rel in base.referenced() if rel.startswith(f"{CHUNK_DIR}/"))
            except Exception as exc:
                own = exc
                plan = {"failure": _Failure.of(0, exc)}
    try:
        plans = group.all_gather(plan)
    except Exception as exc:
        raise _lost(store, group, "planning", exc) from exc
    failure = _check_plans(plans, store.url)
    if failure is not None:
        raise failure.exception(group, own)
    assert isinstance(prepared, _Local)
    leader = plans[0]
    itr = prepared.itr
    path = _object_path(itr, leader["token"], group.rank)
    report: dict[str, Any]
    try:
        objects = StoredObjects(frozenset(leader["committed"]), f"{leader['token']}{group.rank:04x}")
        report = _write_rank(store, group, prepared, path, leader["created"], objects, progress)
    except Exception as exc:
        own = exc
        report = {"failure": _Failure.of(group.rank, exc)}
    written = "size" in report
    try:
        reports = group.gather(report)
    except Exception as exc:
        if group.rank == 0 and written:  # rank 0 commits only after this gather: nothing was committed
            _delete(store, path)
        found = _committed_anyway(store, group, itr, leader["token"])
        if found is not None:
            return found
        raise _lost(store, group, "gathering", exc, itr=itr, token=leader["token"]) from exc
    outcome: SnapshotInfo | _Failure | None = None
    if group.rank == 0:
        outcome, commit_error = _commit(store, group, prepared, leader, reports, base)
        own = commit_error or own
    try:
        outcome = group.broadcast(outcome)
    except Exception as exc:
        if isinstance(outcome, SnapshotInfo):  # rank 0 knows it committed
            logger.warning("itr %d committed to %s, but not every rank heard so: %s", itr, store.url, exc)
            return outcome
        if group.rank == 0:
            assert isinstance(outcome, _Failure)
            raise outcome.exception(group, own) from None
        found = _committed_anyway(store, group, itr, leader["token"])
        if found is not None:
            return found
        raise _lost(store, group, "hearing the outcome", exc, itr=itr, token=leader["token"]) from exc
    if isinstance(outcome, SnapshotInfo):
        return outcome
    assert isinstance(outcome, _Failure)
    if written and group.rank != 0 and not outcome.committing:  # rank 0 already deleted its own
        _delete(store, path)
    raise outcome.exception(group, own)


def _check_plans(plans: list[dict[str, Any]], url: str) -> _Failure | None:
    """The first failure reported, or a ValueError (as a failure of every rank) if the ranks disagree."""
    for plan in plans:
        if "failure" in plan:
            failure: _Failure = plan["failure"]
            return failure
    leader = plans[0]
    for rank, plan in enumerate(plans[1:], 1):
        problem = None
        if plan["itr"] != leader["itr"]:
            problem = f"rank {rank} saves itr {plan['itr']} but rank 0 saves itr {leader['itr']}"
        elif plan["layout"] != leader["layout"]:
            problem = (
                f"rank {rank} passes keys {_describe(plan['layout'])} but rank 0 passes {_describe(leader['layout'])}:"
                " every rank must pass the same keys, each Sharded on all ranks or on none"
            )
        else:
            differ = [k for k in leader["sizes"] if plan["sizes"].get(k) != leader["sizes"][k]]
            if differ:
                problem = (
                    f"replicated key {differ[0]!r} holds {plan['sizes'][differ[0]]} bytes of tensors on rank {rank} "
                    f"but {leader['sizes'][differ[0]]} on rank 0: a replicated value is written by one rank only; "
                    "wrap per-rank values in bucketsnap.Sharded"
                )
        if problem is not None:
            return _Failure.of(rank, ValueError(f"distributed save to {url} refused, nothing written: {problem}"))
    return None


def _describe(layout: list[tuple[str, bool]]) -> str:
    return str([f"Sharded({k})" if sharded else k for k, sharded in layout])


def _write_rank(
    store: SnapshotStore,
    group: _Group,
    prepared: _Local,
    path: str,
    created: datetime,
    objects: StoredObjects,
    progress: ProgressCallback | None,
) -> dict[str, Any]:
    """Write this rank's members to ``path``; report what the commit needs. Ranks with nothing to write skip it."""
    if not prepared.values and group.rank != 0:
        return {"members": {}, "refs": []}
    rank_meta = {**archive_meta(prepared.itr, created, prepared.metrics), "rank": group.rank, "world_size": group.world}
    written = write_archive(
        store.storage,
        path,
        prepared.values,
        rank_meta,
        level=store.compression_level,
        threads=store.compression_threads,
        objects=objects,
        progress=progress,
    )
    return {
        "path": path,
        "size": written.size,
        "checksum": written.checksum,
        "members": written.members,
        "refs": list(written.refs),
    }


def _commit(
    store: SnapshotStore,
    group: _Group,
    prepared: _Local,
    leader: dict[str, Any],
    reports: list[dict[str, Any]],
    base: Manifest,
) -> tuple[SnapshotInfo | _Failure, BaseException | None]:
    """On rank 0: commit every rank's members as one snapshot, or report why not.

    Before the commit, rank 0 deletes its own object and each other rank its own. Once the commit is tried,
    only a commit refused for sure deletes them (rank 0, all of them); one whose outcome is unknown leaves
    them to gc, so that no rank deletes an archive of a snapshot that did commit.
    """
    failures = [r["failure"] for r in reports if "failure" in r]
    if failures:
        if "path" in reports[0]:
            _delete(store, reports[0]["path"])
        return failures[0], None
    members: dict[str, MemberInfo] = {}
    for rank, report in enumerate(reports):
        for key, member in report["members"].items():
            members[key] = member if rank == 0 else replace(member, path=report["path"])
    order = [
        name
        for key, sharded in prepared.layout
        for name in ([shard_key(key, r) for r in range(group.world)] if sharded else [key])
    ]
    info = SnapshotInfo(
        itr=prepared.itr,
        path=reports[0]["path"],
        url=store.storage.url_of(reports[0]["path"]),
        size=reports[0]["size"],
        created=leader["created"],
        metrics=prepared.metrics,
        members={name: members[name] for name in order},
        refs=tuple(sorted({ref for report in reports for ref in report["refs"]})),
        checksums={r["path"]: r["checksum"] for r in reports if "path" in r},
    )
    written = [r["path"] for r in reports if "path" in r]
    try:
        store._commit_new(info, base, overwrite=prepared.overwrite, written=written)
    except Exception as exc:
        return replace(_Failure.of(0, exc), committing=True), exc
    logger.info("committed itr %d from %d ranks to %s", info.itr, group.world, store.url)
    return info, None


def _committed_anyway(store: SnapshotStore, group: _Group, itr: int, token: str) -> SnapshotInfo | None:
    """After losing the group past the gather: the snapshot, if rank 0 committed it all the same."""
    if group.rank == 0:
        return None  # rank 0 commits only after the gather, and knows whether it did
    with contextlib.suppress(Exception):
        committed = store._log.read().find(itr)
        if committed is not None and committed.path == _object_path(itr, token, 0):
            logger.warning("rank %d lost the group, but itr %d was committed to %s", group.rank, itr, store.url)
            return committed
    return None


def _lost(
    store: SnapshotStore, group: _Group, step: str, exc: BaseException, *, itr: int = -1, token: str = ""
) -> DistributedSaveError:
    """The error for a collective that failed: some rank died, timed out, or never called save.

    Before the gather, and on rank 0 (which commits only after it), nothing can have been committed. Any other
    rank cannot know whether rank 0 will still commit: its object is left for ``gc()``.
    """
    outcome = " Nothing of it was committed."
    if token and group.rank != 0:
        outcome = (
            f" Rank 0 may still commit it; if not, gc() removes this rank's object "
            f"{store.storage.url_of(_object_path(itr, token, group.rank))}."
        )
    return DistributedSaveError(
        f"distributed save to {store.url} failed on rank {group.rank} of {group.world} while {step}: another rank "
        f"died, timed out, or did not call save ({type(exc).__name__}: {exc}).{outcome} With torch.distributed "
        "initialised, save is collective: call it on every rank, or pass process_group='local' to save alone. "
        "After a lost rank the process group is unusable: restart the job and resume from the last snapshot."
    )


def _object_path(itr: int, token: str, rank: int) -> str:
    return f"{SNAPSHOT_DIR}/{itr:012d}-{token}-rank{rank}.zip"


def _delete(store: SnapshotStore, path: str) -> None:
    try:
        store.storage.delete(path)
    except BucketsnapError as exc:  # the object is unreferenced: gc removes it later
        logger.warning("could not delete %s after a failed save: %s", store.storage.url_of(path), exc)
