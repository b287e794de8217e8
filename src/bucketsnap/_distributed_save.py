"""The ranks of a ``torch.distributed`` group as a :class:`~bucketsnap._pipeline.World`: what a distributed save
adds to the one save pipeline (:mod:`bucketsnap._pipeline`), as :mod:`bucketsnap.distributed` describes it.

Three things are added here. Which members each rank writes (:func:`_share`: its ``Sharded`` values, and the
replicated keys assigned to it by size). How an error travels to the other ranks (:func:`_failure`: pickled
where it can be rebuilt). What a lost rank looks like (:meth:`_Ranks.lost`). The order of the steps, the
names and the commit belong to the pipeline. :meth:`SnapshotStore.save <bucketsnap.SnapshotStore.save>` and
``save_async`` call :func:`save_job`.

The trade-off: errors met while preparing a distributed save are not raised at once but by the save's job,
on every rank, so that no rank is left waiting in a collective for a rank that already gave up.
"""

from __future__ import annotations

import contextlib
import pickle
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from bucketsnap._info import SnapshotInfo
from bucketsnap._pipeline import Failure, SavePipeline
from bucketsnap._progress import ProgressCallback
from bucketsnap._saving import Share, prepare
from bucketsnap._values import HostBuffer
from bucketsnap.distributed import DistributedSaveError, ProcessGroupArg, Sharded, _process_group, shard_key

__all__ = ["save_job"]


def save_job(
    pipeline: SavePipeline,
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
    """A distributed save, prepared in the caller's thread, or None when the process saves alone.

    A save is distributed when a process group applies (see :func:`bucketsnap.distributed._process_group`), or
    when the state holds ``Sharded`` values (a lone process then saves them as rank 0 of a world of one). The
    returned callable runs the pipeline (in the caller's thread for ``save``, in the background for
    ``save_async``), in the order the saves were called, which is the same on every rank. Errors met while
    preparing are not raised here: the other ranks must hear about them, so they are raised by the callable,
    on every rank. ``copy`` and ``host_buffer`` are as in :func:`bucketsnap._values.encode`; buffers taken from
    ``host_buffer`` are read until the callable returns.
    """
    pg = _process_group(process_group)
    sharded = isinstance(state, Mapping) and any(isinstance(v, Sharded) for v in state.values())
    if pg is None and not sharded:
        return None
    world = _Ranks(pg)
    prepared: Any
    try:
        prepared = prepare(
            itr, state, metrics, overwrite=overwrite, copy=copy, host_buffer=host_buffer, share=world.share
        )
    except Exception as exc:
        prepared = exc
    sequencer = _sequencer(pg)
    ticket = sequencer.take()

    def job() -> SnapshotInfo:
        with sequencer.turn(ticket):
            return pipeline.save(prepared, progress, world)

    return job


class _Ranks:
    """This process's rank in a process group (or rank 0 of 1 without one) and the object collectives of a save."""

    ranked = True

    def __init__(self, pg: dist.ProcessGroup | None) -> None:
        self.pg = pg
        self.rank = 0 if pg is None else int(dist.get_rank(pg))
        self.size = 1 if pg is None else int(dist.get_world_size(pg))

    def share(self, state: Mapping[str, Any]) -> Share:
        return _share(state, self.rank, self.size)

    def all_gather(self, obj: Any) -> list[Any]:
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj, group=self.pg)
        return out

    def gather(self, obj: Any) -> list[Any]:
        if self.size == 1:
            return [obj]
        assert self.pg is not None
        out: list[Any] | None = [None] * self.size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=dist.get_global_rank(self.pg, 0), group=self.pg)
        return out or []

    def broadcast(self, obj: Any) -> Any:
        if self.size == 1:
            return obj
        assert self.pg is not None
        box = [obj]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.pg, 0), group=self.pg)
        return box[0]

    def failure(self, exc: BaseException) -> Failure:
        return _failure(self.rank, exc)

    def error(self, failure: Failure, own: BaseException | None) -> BaseException:
        """This rank's own error if it failed itself, else a copy of the failing rank's."""
        if own is not None and failure.rank == self.rank:
            return own
        exc: BaseException | None = None
        payload = failure.payload
        if payload is not None:
            with contextlib.suppress(Exception):
                exc = pickle.loads(payload)  # sent by a rank of this job, never read from the bucket
        if not isinstance(exc, BaseException):
            exc = DistributedSaveError(f"rank {failure.rank} of {self.size} failed: {failure.kind}: {failure.message}")
        if hasattr(exc, "add_note"):
            exc.add_note(f"raised on rank {failure.rank} of {self.size} during a distributed save")
        return exc

    def check(self, plans: list[dict[str, Any]], url: str) -> Failure | None:
        return _check_plans(plans, url)

    def lost(self, step: str, exc: Exception, url: str, stray: str | None) -> BaseException:
        """The error for a collective that failed: some rank died, timed out, or never called save.

        Before the gather, and on rank 0 (which commits only after it), nothing can have been committed. Any
        other rank cannot know whether rank 0 will still commit: its archive ``stray`` is left for gc.
        """
        outcome = " Nothing of it was committed."
        if stray is not None:
            outcome = f" Rank 0 may still commit it; if not, gc() removes this rank's object {stray}."
        return DistributedSaveError(
            f"distributed save to {url} failed on rank {self.rank} of {self.size} while {step}: another rank "
            f"died, timed out, or did not call save ({type(exc).__name__}: {exc}).{outcome} With torch.distributed "
            "initialised, save is collective: call it on every rank, or pass process_group='local' to save alone. "
            "After a lost rank the process group is unusable: restart the job and resume from the last snapshot."
        )


def _failure(rank: int, exc: BaseException) -> Failure:
    """``exc`` as every rank can raise it: pickled, where it pickles and can be rebuilt."""
    try:
        data = pickle.dumps(exc)
        pickle.loads(data)  # some exceptions pickle but cannot be rebuilt
    except Exception:
        return Failure(rank, type(exc).__name__, str(exc))
    return Failure(rank, type(exc).__name__, str(exc), data)


# -- which rank writes what --------------------------------------------------------------------------------------


def _share(state: Mapping[str, Any], rank: int, size: int) -> Share:
    """Rank ``rank``'s part of ``state``: its shard of each Sharded key, and the replicated keys assigned to it."""
    sizes = {k: _nbytes(v) for k, v in state.items() if not isinstance(v, Sharded)}
    owners = _assign(sizes, size)
    members: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, Sharded):
            members[shard_key(key, rank)] = value.value
        elif owners[key] == rank:
            members[key] = value
    layout = tuple((k, isinstance(v, Sharded)) for k, v in state.items())
    names = tuple(name for key, sharded in layout for name in _names(key, sharded, size))
    return Share(members, layout, sizes, names)


def _names(key: str, sharded: bool, size: int) -> list[str]:
    return [shard_key(key, r) for r in range(size)] if sharded else [key]


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


def _check_plans(plans: list[dict[str, Any]], url: str) -> Failure | None:
    """The first failure reported, or a ValueError (as a failure of every rank) if the ranks disagree."""
    for plan in plans:
        if "failure" in plan:
            failure: Failure = plan["failure"]
            return failure
    leader = plans[0]
    for rank, plan in enumerate(plans[1:], 1):
        problem = None
        if plan["itr"] != leader["itr"]:
            problem = f"rank {rank} saves itr {plan['itr']} but rank 0 saves itr {leader['itr']}"
        elif list(plan["layout"]) != list(leader["layout"]):
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
            return _failure(rank, ValueError(f"distributed save to {url} refused, nothing written: {problem}"))
    return None


def _describe(layout: Any) -> str:
    return str([f"Sharded({k})" if sharded else k for k, sharded in layout])


# -- the order of a group's saves --------------------------------------------------------------------------------


class _Sequencer:
    """Runs a group's saves in the order they were called, which is the same on every rank.

    Collectives must be issued in the same order on every rank; background saves (``max_in_flight > 1``) would
    otherwise race for the group.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._issued = 0
        self._serving = 0

    def take(self) -> int:
        with self._cond:
            self._issued += 1
            return self._issued - 1

    @contextlib.contextmanager
    def turn(self, ticket: int) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: self._serving == ticket)
        try:
            yield
        finally:
            with self._cond:
                self._serving += 1
                self._cond.notify_all()


_sequencers_lock = threading.Lock()
_sequencers: dict[int, _Sequencer] = {}


def _sequencer(pg: dist.ProcessGroup | None) -> _Sequencer:
    if pg is None:
        return _Sequencer()  # no collectives: nothing to order
    with _sequencers_lock:
        return _sequencers.setdefault(id(pg), _Sequencer())
