"""Saves across ``torch.distributed`` ranks: each rank writes its own archive, rank 0 commits them all at once.

bucketsnap invents no cluster: a distributed save runs a few object collectives over a ``torch.distributed``
process group and writes straight to the store. Every rank of the group calls
:meth:`~bucketsnap.SnapshotStore.save` (or ``save_async``) with the same keys, and the protocol is:

1. **plan.** ``all_gather_object`` of each rank's summary (itr, keys, replicated sizes) or of the error it met
   while validating and serializing; rank 0 adds a random token and whether ``itr`` is already committed. Every
   rank checks the gathered plans the same way, so either every rank goes on or every rank raises the same
   error, before anything is written.
2. **write.** Rank ``r`` streams its members to ``snapshots/<itr>-<token>-rank<r>.zip``, in parallel with the
   other ranks (a rank with no member writes nothing, except rank 0, whose archive is the snapshot's own).
3. **gather.** ``gather_object`` of each rank's member table, or of its error, to rank 0.
4. **commit.** If every rank succeeded, rank 0 commits one manifest generation whose entry lists every member
   with the object that holds it (:attr:`MemberInfo.path`). The exclusive create of that generation is the
   single instant at which the whole multi-rank snapshot becomes visible: never part of it.
5. **outcome.** ``broadcast_object_list`` of the committed :class:`SnapshotInfo`, or of the error; every rank
   returns the same info or raises the same error.

Which rank writes what (the naming rule):

* a value wrapped in :class:`Sharded` is this rank's part of ``key``: each rank writes its own, as member
  ``<key>@rank<r>`` (``@`` cannot appear in a key, so shard names never collide with keys);
* any other value is **replicated**: the same on every rank, written once, by one rank; replicated keys are
  spread over the ranks by size so that their upload is parallel too.

Failures. If a rank raises (bad key, unserializable value, storage error), nothing is committed, the ranks
delete the objects they wrote, and every rank raises that rank's error (a copy of it where it pickles, else
:class:`DistributedSaveError`); the process group stays usable. If a rank dies or stops answering, the others
raise :class:`DistributedSaveError` when the group's timeout expires (at once on gloo, where the dead peer's
sockets close). Rank 0 commits only after hearing from every rank, so a lost rank never causes a partial commit.
A rank that loses contact with rank 0 *after* writing cannot know whether rank 0 committed: it returns the
committed info if the manifest already lists it, else raises and leaves its object for
:meth:`~bucketsnap.SnapshotStore.gc`, which removes it once older than ``min_age``.

The trade-off: three small collectives per save (plan, gather, outcome) and one manifest commit, whatever the
world size; in exchange no rank ever waits for another's upload, and restores need no process group at all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from bucketsnap.archive import ArchiveWriter
from bucketsnap.errors import BucketsnapError
from bucketsnap.info import MemberInfo, SnapshotInfo, check_metrics
from bucketsnap.manifest import SNAPSHOT_DIR, Which
from bucketsnap.progress import ByteCounter, ProgressCallback
from bucketsnap.store import ExternalValue, _check_itr, _check_state, _meta, _prepare_value
from bucketsnap.values import EncodedValue, MapLocation, encode

if TYPE_CHECKING:
    from bucketsnap.store import SnapshotStore

__all__ = [
    "LOCAL",
    "DistributedSaveError",
    "agree_on_preemption",
    "ProcessGroupArg",
    "Sharded",
    "load_rank",
    "shard_key",
    "shard_keys",
]

logger = logging.getLogger("bucketsnap")

T = TypeVar("T")

#: ``process_group=LOCAL``: save from this process alone even though ``torch.distributed`` is initialised.
LOCAL: Literal["local"] = "local"

#: What ``save(process_group=...)`` accepts: a group, None (the default group if initialised), or ``"local"``.
ProcessGroupArg = dist.ProcessGroup | Literal["local"] | None

_SHARD = re.compile(r"^(?P<key>.+)@rank(?P<rank>\d+)$")


class DistributedSaveError(BucketsnapError, RuntimeError):
    """A distributed save failed on some rank, or a rank stopped answering; nothing was committed."""


@dataclass(frozen=True)
class Sharded(Generic[T]):
    """This rank's part of a value: every rank saves its own, as member ``<key>@rank<r>``.

    Example:
        >>> state = {"policy": {"w": torch.zeros(2)}, "optimizer": Sharded({"m": torch.ones(2)})}
        >>> isinstance(state["optimizer"], Sharded)
        True
    """

    value: T


def shard_key(key: str, rank: int) -> str:
    """The member name of rank ``rank``'s shard of ``key``.

    >>> shard_key("optimizer", 3)
    'optimizer@rank3'
    """
    return f"{key}@rank{rank}"


def shard_keys(info: SnapshotInfo, key: str) -> list[str]:
    """The member names of every rank's shard of ``key`` in ``info``, by rank (their count is the saved world size).

    Raises:
        KeyError: ``info`` holds no shard of ``key``.
    """
    shards = _layout(info).get(key)
    if not shards:
        raise KeyError(f"snapshot itr {info.itr} at {info.url} has no sharded key {key!r}; it has {info.keys()}")
    return [shards[rank] for rank in sorted(shards)]


def load_rank(
    store: SnapshotStore,
    which: Which = "last",
    *,
    keys: Iterable[str] | None = None,
    rank: int | None = None,
    process_group: dist.ProcessGroup | None = None,
    map_location: MapLocation = None,
    allow_pickle: bool = False,
) -> dict[str, Any]:
    """This rank's view of a snapshot: each replicated member, and this rank's shard of each sharded key.

    Shards come back under their plain key (``"optimizer"``, not ``"optimizer@rank1"``). Reads only the members
    it returns. Needs no collective: any rank (or a single process) may call it alone.

    Args:
        store: the run.
        which: ``"last"``, ``"first"`` or an int itr.
        keys: the plain keys to load (all if None).
        rank: whose shards to read; default: this process's rank in ``process_group`` (or in the default
            group if initialised, else 0).
        process_group: the group that ``rank`` defaults to a rank of.
        map_location: as in :meth:`~bucketsnap.SnapshotStore.load`.
        allow_pickle: as in :meth:`~bucketsnap.SnapshotStore.load`.

    Raises:
        KeyError: an unknown key, or a sharded key saved by fewer ranks than ``rank + 1`` (read the shards you
            need with :func:`shard_keys` when restoring at a different world size).
    """
    if rank is None:
        rank = _current_rank(process_group)
    snapshot = store.open(which, map_location=map_location, allow_pickle=allow_pickle)
    layout = _layout(snapshot.info)
    out: dict[str, Any] = {}
    for key in list(layout) if keys is None else list(keys):
        if key not in layout:
            raise KeyError(f"snapshot itr {snapshot.info.itr} at {store.url} has no key {key!r}; it has {list(layout)}")
        shards = layout[key]
        if shards is None:
            out[key] = snapshot[key]
        elif rank in shards:
            out[key] = snapshot[shards[rank]]
        else:
            raise KeyError(
                f"snapshot itr {snapshot.info.itr} at {store.url} holds {len(shards)} shards of {key!r}, none for "
                f"rank {rank}: it was saved at another world size. Read the shards you need by name: "
                f"shard_keys(info, {key!r})"
            )
    return out


def _layout(info: SnapshotInfo) -> dict[str, dict[int, str] | None]:
    """Plain key -> None (replicated) or {rank: member name}, in saved order."""
    layout: dict[str, dict[int, str] | None] = {}
    for name in info.members:
        match = _SHARD.match(name)
        if match is None:
            layout[name] = None
        else:
            shards = layout.setdefault(match["key"], {})
            if shards is not None:
                shards[int(match["rank"])] = name
    return layout


def _current_rank(process_group: dist.ProcessGroup | None) -> int:
    if process_group is not None:
        return int(dist.get_rank(process_group))
    return int(dist.get_rank()) if dist.is_available() and dist.is_initialized() else 0


class _Preemptible(Protocol):
    """What :func:`agree_on_preemption` needs of a :class:`~bucketsnap.preemption.PreemptionHandler`."""

    @property
    def requested(self) -> bool: ...

    signals: tuple[int, ...]


def agree_on_preemption(handler: _Preemptible, *, process_group: ProcessGroupArg = None) -> bool:
    """Collective, once per step on every rank: if any rank was signalled, make every rank's handler save.

    A preemption signal may reach one rank only (one host of several). Call this inside the handler's
    ``hold()`` block at the end of each step: it all-reduces "was I signalled" over the group, and on ranks that
    were not, sends the handler's first signal to this process. Every handler then runs as the ``hold()``
    block exits, at the same step on every rank, and their final saves form one collective save: one final
    snapshot of all ranks, or none (never a part of one). Returns whether a preemption is under way.

    Example:
        >>> import signal, bucketsnap
        >>> from bucketsnap.preemption import on_preemption
        >>> store, step = bucketsnap.SnapshotStore("memory://doc/agree"), 0
        >>> with on_preemption(store, lambda: {"step": step}, itr_fn=lambda: step, signals=[signal.SIGUSR1]) as h:
        ...     with h.hold():
        ...         step += 1  # a training step
        ...         agree_on_preemption(h)
        False
    """
    group = _resolve(process_group)
    requested = handler.requested
    if group.pg is None:
        return requested
    flag = torch.tensor([int(requested)])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group.pg)
    anywhere = bool(flag.item())
    if anywhere and not requested:
        os.kill(os.getpid(), handler.signals[0])  # handled when the hold() block exits
    return anywhere


# -- the collectives ---------------------------------------------------------------------------------------------


class _Group:
    """The three collectives of a save, over a process group, or trivially for a process alone."""

    def __init__(self, pg: dist.ProcessGroup | None) -> None:
        self.pg = pg
        self.rank = 0 if pg is None else int(dist.get_rank(pg))
        self.world = 1 if pg is None else int(dist.get_world_size(pg))
        self.sequencer = _sequencer(pg)

    def all_gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.pg)
        return out

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` on rank 0; an empty list elsewhere."""
        if self.world == 1:
            return [obj]
        assert self.pg is not None
        out: list[Any] | None = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, out, dst=dist.get_global_rank(self.pg, 0), group=self.pg)
        return out or []

    def broadcast(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        assert self.pg is not None
        box = [obj]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.pg, 0), group=self.pg)
        return box[0]


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


_registry_lock = threading.Lock()
_sequencers: dict[int, _Sequencer] = {}
_side_groups: dict[int, dist.ProcessGroup] = {}


def _sequencer(pg: dist.ProcessGroup | None) -> _Sequencer:
    if pg is None:
        return _Sequencer()  # no collectives: nothing to order
    with _registry_lock:
        return _sequencers.setdefault(id(pg), _Sequencer())


def _resolve(process_group: ProcessGroupArg) -> _Group:
    """The group a save runs on: the one given, bucketsnap's own gloo group over the world, or none."""
    if process_group == LOCAL:
        return _Group(None)
    if process_group is not None:
        return _Group(process_group)  # type: ignore[arg-type]
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return _Group(None)
    return _Group(_side_group())


def _side_group() -> dist.ProcessGroup:
    """A gloo group over the whole world, used by bucketsnap's saves only, created on the first save.

    A group of its own, so that a background save's collectives never interleave with the training loop's
    (which may run on the default group at the same time), and so that object collectives stay on the CPU even
    when the default backend is NCCL. Creating it is itself a collective: every rank makes its first save at
    the same point, so every rank creates it in the same order.
    """
    world = dist.distributed_c10d._get_default_group()
    with _registry_lock:
        group = _side_groups.get(id(world))
        if group is None:
            group = dist.new_group(backend="gloo", timeout=_timeout_of(world))
            _side_groups[id(world)] = group
        return group


def _timeout_of(pg: dist.ProcessGroup) -> timedelta | None:
    """The timeout ``pg`` was created with, where torch exposes it; None means torch's default."""
    for device in ("cpu", "cuda"):
        with contextlib.suppress(Exception):
            timeout = pg._get_backend(torch.device(device)).options._timeout
            if isinstance(timeout, timedelta):
                return timeout
    return None


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
    group: _Group, itr: Any, state: Any, metrics: Mapping[str, Any] | None, *, overwrite: bool, copy: bool
) -> _Local:
    itr = _check_itr(itr)
    _check_state(state)
    metric_values = check_metrics(dict(metrics or {}))
    sizes = {k: _nbytes(v) for k, v in state.items() if not isinstance(v, Sharded)}
    owners = _assign(sizes, group.world)
    values: dict[str, EncodedValue | ExternalValue] = {}
    for key, value in state.items():
        if isinstance(value, Sharded):
            values[shard_key(key, group.rank)] = _prepare_value(value.value, copy=copy)
        elif owners[key] == group.rank:
            values[key] = _prepare_value(value, copy=copy)
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
) -> Callable[[], SnapshotInfo] | None:
    """A distributed save, prepared in the caller's thread, or None when the plain single-process save applies.

    The returned callable runs the collectives and the write (in the caller's thread for ``save``, in the
    background for ``save_async``). Errors met while preparing are not raised here: the other ranks must
    hear about them, so they are raised by the callable, on every rank.
    """
    group = _resolve(process_group)
    sharded = isinstance(state, Mapping) and any(isinstance(v, Sharded) for v in state.values())
    if group.pg is None and not sharded:
        return None
    prepared: _Local | BaseException
    try:
        prepared = _prepare_local(group, itr, state, metrics, overwrite=overwrite, copy=copy)
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
    if isinstance(prepared, BaseException):
        plan = {"failure": _Failure.of(group.rank, prepared)}
    else:
        plan = {"itr": prepared.itr, "layout": prepared.layout, "sizes": prepared.sizes}
        if group.rank == 0:
            plan.update(token=uuid.uuid4().hex[:16], created=datetime.now(timezone.utc))
            try:
                if not prepared.overwrite and store._log.read().find(prepared.itr) is not None:
                    raise store._exists(prepared.itr)
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
        report = _write_rank(store, group, prepared, path, leader["created"], progress)
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
        outcome, commit_error = _commit(store, group, prepared, leader, reports)
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
    if written and group.rank != 0:  # rank 0 already deleted its own
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
    progress: ProgressCallback | None,
) -> dict[str, Any]:
    """Write this rank's members to ``path``; report what the commit needs. Ranks with nothing to write skip it."""
    refs: set[str] = set()
    values: dict[str, EncodedValue] = {}
    for key, value in prepared.values.items():
        if isinstance(value, EncodedValue):
            values[key] = value
        else:  # a replay buffer's chunks and the like: objects of their own, then a small member
            member, paths = value.write_objects(store.storage)
            values[key] = encode(member)
            refs.update(paths)
    if not values and group.rank != 0:
        return {"members": {}, "refs": []}
    counter = None if progress is None else ByteCounter(sum(v.raw_size for v in values.values()), progress)
    meta = {**_meta(prepared.itr, created, prepared.metrics), "rank": group.rank, "world_size": group.world}
    with store.storage.write(path) as f:
        writer = ArchiveWriter(
            f,
            level=store.compression_level,
            threads=store.compression_threads,
            progress=None if counter is None else counter.add,
        )
        for key, encoded in values.items():
            writer.add_encoded(key, encoded)
        size = writer.finish({**meta, **({"refs": sorted(refs)} if refs else {})})
    return {"path": path, "size": size, "members": dict(writer.members), "refs": sorted(refs)}


def _commit(
    store: SnapshotStore, group: _Group, prepared: _Local, leader: dict[str, Any], reports: list[dict[str, Any]]
) -> tuple[SnapshotInfo | _Failure, BaseException | None]:
    """On rank 0: commit every rank's members as one snapshot, or report why not (deleting rank 0's object)."""
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
    )
    try:
        store._commit_new(info, overwrite=prepared.overwrite)  # deletes rank 0's object if it fails
    except Exception as exc:
        return _Failure.of(0, exc), exc
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
