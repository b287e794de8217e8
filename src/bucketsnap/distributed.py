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

The steps are those of every save (:mod:`bucketsnap._pipeline`, where a process alone is a world of one);
:mod:`bucketsnap._distributed_save` adds what ranks need (which rank writes what, how errors travel between
them, the order of a group's saves). This module holds the public helpers and chooses the process group.

The trade-off: three small collectives per save (plan, gather, outcome) and one manifest commit, whatever the
world size; in exchange no rank ever waits for another's upload, and restores need no process group at all.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, TypeVar

import torch
import torch.distributed as dist

from bucketsnap._info import SnapshotInfo
from bucketsnap._manifest import Which
from bucketsnap._values import MapLocation
from bucketsnap.errors import BucketsnapError

if TYPE_CHECKING:
    from bucketsnap._store import SnapshotStore

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
    """What :func:`agree_on_preemption` needs of a :class:`~bucketsnap._preemption.PreemptionHandler`."""

    @property
    def requested(self) -> bool: ...

    signals: tuple[int, ...]

    def agreed(self, anywhere: bool) -> None: ...


def agree_on_preemption(handler: _Preemptible, *, process_group: ProcessGroupArg = None) -> bool:
    """Collective, once per step on every rank: if any rank was signalled, make every rank's handler save.

    A preemption signal may reach one rank only (one host of several). Call this inside the handler's
    ``hold()`` block at the end of each step: it all-reduces "was I signalled" over the group, and on ranks that
    were not, sends the handler's first signal to this process. Every handler then runs as the ``hold()``
    block exits, at the same step on every rank, and their final saves form one collective save: one final
    snapshot of all ranks, or none (never a part of one). A signal that reaches a rank after its step's
    agreement was made waits for the next step's (see :meth:`~bucketsnap._preemption.PreemptionHandler.agreed`).
    Returns whether a preemption is under way.

    Example:
        >>> import signal, bucketsnap
        >>> from bucketsnap._preemption import on_preemption
        >>> store, step = bucketsnap.SnapshotStore("memory://doc/agree"), 0
        >>> with on_preemption(store, lambda: {"step": step}, itr_fn=lambda: step, signals=[signal.SIGUSR1]) as h:
        ...     with h.hold():
        ...         step += 1  # a training step
        ...         agree_on_preemption(h)
        False
    """
    pg = _process_group(process_group)
    requested = handler.requested
    if pg is None:
        return requested
    flag = torch.tensor([int(requested)])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=pg)
    anywhere = bool(flag.item())
    # Before the signal below: a signal that reached this rank after ``requested`` was read (so the others did
    # not hear of it) must wait for the next agreement, not start a final save that no other rank joins.
    handler.agreed(anywhere)
    if anywhere and not requested:
        os.kill(os.getpid(), handler.signals[0])  # handled when the hold() block exits
    return anywhere


# -- the process group of a save ---------------------------------------------------------------------------------


_registry_lock = threading.Lock()
_side_groups: dict[int, dist.ProcessGroup] = {}


def _process_group(process_group: ProcessGroupArg) -> dist.ProcessGroup | None:
    """The group a save (or :func:`agree_on_preemption`) runs on: the one given, bucketsnap's own gloo group over
    the world when ``torch.distributed`` is initialised with more than one rank, or None (a process alone)."""
    if process_group == LOCAL:
        return None
    if process_group is not None:
        return process_group  # type: ignore[return-value]
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    return _side_group()


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
