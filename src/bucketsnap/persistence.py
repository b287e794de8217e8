"""tianshou-style persistence: ``PersistEvent``, ``RestoreEvent``, ``Persistence``, ``PersistenceGroup`` and
``PolicyPersistence``, writing bucketsnap snapshots instead of files in a directory.

tianshou's ``PolicyPersistence`` ``torch.save``-s the policy to ``<dir>/policy.pt`` and then lets an additional
persistence write its own files beside it. Here one persist is one committed snapshot: the policy is the member
named after the mode (``"policy"`` or ``"policy_state_dict"``), and additional persistences add their own members
to ``world.members`` before the commit, so the policy and what goes with it (observation normalisation, say)
are committed together or not at all. On restore, the snapshot is opened lazily as ``world.snapshot``; each
persistence reads only its own members.

The classes take tianshou's calls as they are (``restore(policy, world, device)``, ``get_save_best_fn(world)``,
``get_save_checkpoint_fn(world)``) and either world: this module's small :class:`World` (the run, the policy, the
itr, the members being persisted), or tianshou's own ``World``, recognised by its ``persist_directory`` without
importing tianshou. With tianshou's world the run is the persistence's ``location`` when it has one, else the
directory tianshou names (``persist_directory`` to persist, ``restore_directory`` to restore), so the same objects
work where tianshou's ``Experiment`` builds its persistence and in ``Environments.set_persistence``.

A run holds two kinds of snapshots: *policies* (each ``save_best_fn`` call, tianshou's ``policy.pt``) and
*checkpoints* (each ``save_checkpoint_fn(epoch, env_step, gradient_step)`` call, tianshou's
``policy_epoch_<n>.pt``), which also hold a ``"trainer"`` member with those three counters. Restoring a policy
reads the newest policy snapshot (as tianshou reads ``policy.pt``); :meth:`PolicyPersistence.restore_checkpoint`
reads the newest checkpoint, to resume training.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from bucketsnap._info import SnapshotInfo
from bucketsnap._snapshot import Snapshot
from bucketsnap._store import SnapshotStore, as_store
from bucketsnap._values import MapLocation
from bucketsnap.errors import SnapshotNotFoundError

__all__ = [
    "PersistEvent",
    "Persistence",
    "PersistenceGroup",
    "PolicyPersistence",
    "RestoreEvent",
    "StateDictPersistence",
    "World",
]

logger = logging.getLogger("bucketsnap")

#: The member of a checkpoint snapshot holding tianshou's counters: ``{"epoch", "env_step", "gradient_step"}``.
TRAINER = "trainer"


class PersistEvent(Enum):
    """Enumeration of persistence events that Persistence objects can react to."""

    PERSIST_POLICY = "persist_policy"
    """Policy neural network is persisted (new best found)"""


class RestoreEvent(Enum):
    """Enumeration of restoration events that Persistence objects can react to."""

    RESTORE_POLICY = "restore_policy"
    """Policy neural network parameters are restored"""


@dataclass
class World:
    """What persistence handlers act on: where snapshots live, the policy, and the snapshot being made or read.

    Attributes:
        location: the run's URL, or a :class:`SnapshotStore`.
        policy: the policy; :meth:`PolicyPersistence.restore` sets it to the restored one.
        itr: the snapshot to write (None: one past the last committed, 0 in an empty run) or to restore
            (None: the newest policy snapshot).
        metrics: saved as the snapshot's metrics (a best return, for ``retention=KeepBest(...)``).
        storage_options: passed to fsspec when ``location`` is a URL.
        members: while persisting, the state the snapshot will hold: persistences add their members here.
        snapshot: while restoring, the snapshot being restored from (members are read when indexed).
        outer: the framework's world this one stands in for (tianshou's ``World``): attributes this class lacks
            (``algorithm``, ``persist_path``, ...) are read from it, so tianshou's own persistences work too.
        store: the :class:`SnapshotStore` at ``location``.
    """

    location: str | SnapshotStore
    policy: Any = None
    itr: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    storage_options: dict[str, Any] | None = field(default=None, repr=False)
    members: dict[str, Any] = field(default_factory=dict, repr=False)
    snapshot: Snapshot | None = field(default=None, repr=False)
    outer: Any = field(default=None, repr=False)
    store: SnapshotStore = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.store = as_store(self.location, storage_options=self.storage_options)

    def __getattr__(self, name: str) -> Any:
        outer = self.__dict__.get("outer")
        if outer is None or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(outer, name)

    def open_snapshot(self, *, map_location: MapLocation = None, allow_pickle: bool = False) -> Snapshot:
        """Open snapshot ``itr`` (the last if None) lazily, and remember it as :attr:`snapshot`."""
        self.snapshot = self.store.open(
            "last" if self.itr is None else self.itr, map_location=map_location, allow_pickle=allow_pickle
        )
        return self.snapshot


def _next_itr(store: SnapshotStore) -> int:
    itrs = store.itrs()
    return itrs[-1] + 1 if itrs else 0


def _newest(store: SnapshotStore, member: str, *, checkpoint: bool | None) -> int | None:
    """The newest itr holding ``member``: among checkpoints (True), policies (False), or either (None)."""
    found = [
        info.itr
        for info in store.infos()
        if member in info.members and (checkpoint is None or (TRAINER in info.members) is checkpoint)
    ]
    return found[-1] if found else None


class _Runs:
    """The run a persistence writes to or reads from, for this module's World or tianshou's (duck-typed)."""

    def __init__(self, location: str | SnapshotStore | None, storage_options: dict[str, Any] | None) -> None:
        self.location = location
        self.storage_options = storage_options
        self._stores: dict[str, SnapshotStore] = {}

    def world(self, world: Any, *, restoring: bool) -> World:
        if isinstance(world, World):
            return world
        if not hasattr(world, "persist_directory"):
            raise TypeError(
                f"expected a bucketsnap.persistence.World or tianshou's World, not {type(world).__name__}: "
                "build World(url, policy) or pass the world tianshou gives"
            )
        named = getattr(world, "restore_directory", None) if restoring else None
        where = named or self.location or (None if restoring else world.persist_directory)
        if where is None:
            raise ValueError(
                "no run to restore from: tianshou's world has no restore_directory (set ExperimentConfig."
                "policy_restore_directory to the run's URL) and this persistence has no location"
            )
        return World(self._store(where), getattr(world, "algorithm", None), outer=world)

    def _store(self, where: str | SnapshotStore) -> SnapshotStore:
        if isinstance(where, SnapshotStore):
            return where
        if where not in self._stores:
            self._stores[where] = as_store(where, storage_options=self.storage_options)
        return self._stores[where]


class Persistence(abc.ABC):
    """Something persisted with the policy: adds members to ``world.members``, reads them from ``world.snapshot``."""

    @abc.abstractmethod
    def persist(self, event: PersistEvent, world: World) -> None:
        """Add what is to be persisted on ``event`` to ``world.members`` (it is committed by the caller)."""

    @abc.abstractmethod
    def restore(self, event: RestoreEvent, world: World) -> None:
        """Restore from ``world.snapshot`` on ``event``."""


class PersistenceGroup(Persistence):
    """Groups persistence handlers so that they are applied collectively, in order.

    Args:
        *p: the handlers.
        enabled: when False, :meth:`persist` does nothing; :meth:`restore` always runs (as in tianshou).
    """

    def __init__(self, *p: Persistence, enabled: bool = True) -> None:
        self.items = p
        self.enabled = enabled

    def persist(self, event: PersistEvent, world: World) -> None:
        if not self.enabled:
            return
        for item in self.items:
            item.persist(event, world)

    def restore(self, event: RestoreEvent, world: World) -> None:
        for item in self.items:
            item.restore(event, world)


class StateDictPersistence(Persistence):
    """Persist ``obj.state_dict()`` as member ``key``; restore it with ``obj.load_state_dict``.

    For anything that goes with the policy and has a state dict: an observation normaliser, an optimizer.
    Given this module's :class:`World`, it adds its member to the snapshot being made. Given tianshou's ``World``
    (tianshou's own ``PolicyPersistence`` calls it so, from ``Environments.set_persistence``), it commits a
    snapshot of its own to ``location``, else to the directory tianshou names, and restores from the newest
    snapshot holding ``key``.

    Args:
        key: the member's name.
        obj: the object with ``state_dict()`` and ``load_state_dict()``.
        location: the run (URL or store) for tianshou's world; None: tianshou's directories.
        storage_options: passed to fsspec with a URL.
    """

    def __init__(
        self,
        key: str,
        obj: Any,
        *,
        location: str | SnapshotStore | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.key = key
        self.obj = obj
        self._runs = _Runs(location, storage_options)

    def persist(self, event: PersistEvent, world: World) -> None:
        if isinstance(world, World):
            world.members[self.key] = self.obj.state_dict()
            return
        store = self._runs.world(world, restoring=False).store
        info = store.save(_next_itr(store), {self.key: self.obj.state_dict()})
        logger.info("persisted %r as itr %d of %s", self.key, info.itr, store.url)

    def restore(self, event: RestoreEvent, world: World) -> None:
        if isinstance(world, World):
            snapshot = world.snapshot if world.snapshot is not None else world.open_snapshot()
        else:
            store = self._runs.world(world, restoring=True).store
            itr = _newest(store, self.key, checkpoint=None)
            if itr is None:
                raise SnapshotNotFoundError(f"no snapshot at {store.url} holds {self.key!r}: persist it first")
            snapshot = store.open(itr)
        self.obj.load_state_dict(snapshot[self.key])


class PolicyPersistence:
    """Handles persistence of the policy: each :meth:`persist` commits one snapshot.

    Args:
        additional_persistence: a persistence invoked whenever this object persists or restores, to add its
            members to the same snapshot or read them from it.
        enabled: whether persisting is enabled (restoring always is).
        mode: :attr:`Mode.POLICY` (the default, as in tianshou) or :attr:`Mode.POLICY_STATE_DICT`; tianshou's own
            ``PolicyPersistence.Mode`` values are accepted too.
        location: the run (URL or store) used with tianshou's ``World``; None: tianshou's ``persist_directory``
            to persist and ``restore_directory`` to restore. This module's :class:`World` names its own run.
        storage_options: passed to fsspec with a URL ``location`` or directory.

    Example:
        >>> import torch
        >>> persistence = PolicyPersistence(mode=PolicyPersistence.Mode.POLICY_STATE_DICT)
        >>> world = World("memory://doc/tianshou", policy=torch.nn.Linear(2, 1))
        >>> persistence.persist(world.policy, world).itr
        0
        >>> fresh = persistence.restore(torch.nn.Linear(2, 1), world)
        >>> torch.equal(fresh.weight, world.policy.weight)
        True
    """

    class Mode(Enum):
        """Mode of persistence."""

        POLICY_STATE_DICT = "policy_state_dict"
        """Persist only the policy's state dictionary, without pickle. Restoring needs a structurally equal
        policy to load it into."""
        POLICY = "policy"
        """Persist the entire policy, cloudpickled, and its state dictionary beside it without pickle. Restoring
        into a policy reads only the state dictionary (no pickle); restoring without one unpickles the policy,
        which executes code from the snapshot (``allow_pickle=True``) and breaks when its class is renamed or
        moved. The weights are stored twice."""

    def __init__(
        self,
        additional_persistence: Any = None,
        enabled: bool = True,
        mode: Any = Mode.POLICY,
        *,
        location: str | SnapshotStore | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.additional_persistence = additional_persistence
        self.enabled = enabled
        self.mode = self.Mode(getattr(mode, "value", mode))
        self._runs = _Runs(location, storage_options)

    def _members(self, policy: Any) -> dict[str, Any]:
        state = {self.Mode.POLICY_STATE_DICT.value: policy.state_dict()}
        return {self.Mode.POLICY.value: policy, **state} if self.mode is self.Mode.POLICY else state

    def _commit(self, target: World, members: dict[str, Any], what: str) -> SnapshotInfo:
        target.members = members
        if self.additional_persistence is not None:
            self.additional_persistence.persist(PersistEvent.PERSIST_POLICY, target)
        store = target.store
        if target.itr is None:
            itr, overwrite = _next_itr(store), False
        else:
            itr, overwrite = target.itr, True  # an explicit itr is replaced, as tianshou overwrites its file
        info = store.save(itr, target.members, metrics=target.metrics, overwrite=overwrite)
        logger.info("persisted %s (%s) as itr %d of %s", what, self.mode.value, itr, store.url)
        return info

    def persist(self, policy: Any, world: Any) -> SnapshotInfo | None:
        """Commit a snapshot of ``policy`` (and the additional persistence's members); None when disabled.

        Raises:
            StorageError: the backend failed; nothing was committed.
        """
        if not self.enabled:
            return None
        target = self._runs.world(world, restoring=False)
        target.policy = policy
        return self._commit(target, self._members(policy), "policy")

    def restore(
        self,
        policy: Any,
        world: Any,
        device: MapLocation = None,
        *,
        map_location: MapLocation = None,
        allow_pickle: bool = False,
    ) -> Any:
        """Restore the policy from snapshot ``world.itr`` (None: the newest policy snapshot) and return it.

        Args:
            policy: the policy to load the weights into, or None in :attr:`Mode.POLICY` to get the unpickled one.
            world: the world; its ``policy`` and ``snapshot`` are set (this module's World).
            device: tianshou's ``device``: where tensors are loaded (as ``map_location``).
            map_location: as in ``torch.load``; overrides ``device``.
            allow_pickle: required to restore :attr:`Mode.POLICY` without a policy; the snapshot's code runs.

        Raises:
            SnapshotNotFoundError: no such snapshot.
            UnsafeLoadError: unpickling needed without ``allow_pickle=True``.
            ValueError: :attr:`Mode.POLICY_STATE_DICT` without a policy, or the run holds only the other mode.
        """
        if policy is None and self.mode is self.Mode.POLICY_STATE_DICT:
            raise ValueError(
                "Mode.POLICY_STATE_DICT restores weights into an existing policy: construct a structurally equal "
                "policy and pass it, or persist with Mode.POLICY"
            )
        target = self._runs.world(world, restoring=True)
        # Into an existing policy the weights suffice, and they are stored without pickle in both modes.
        wanted = self.mode.value if policy is None else self.Mode.POLICY_STATE_DICT.value
        itr = target.itr if target.itr is not None else self._newest_policy(target.store, wanted)
        snapshot = target.store.open(itr, map_location=map_location or device, allow_pickle=allow_pickle)
        target.snapshot = snapshot
        name = wanted if wanted in snapshot else self.mode.value
        if name not in snapshot:
            raise ValueError(
                f"snapshot itr {snapshot.info.itr} at {target.store.url} has no {self.mode.value!r} member (it has "
                f"{list(snapshot)}): it was persisted in another mode; restore with "
                "PolicyPersistence(mode=...) set to the mode it was persisted with"
            )
        loaded = snapshot[name]
        if policy is None:
            policy = loaded
        else:
            policy.load_state_dict(loaded if name == self.Mode.POLICY_STATE_DICT.value else loaded.state_dict())
        target.policy = policy
        if self.additional_persistence is not None:
            self.additional_persistence.restore(RestoreEvent.RESTORE_POLICY, target)
        return policy

    def _newest_policy(self, store: SnapshotStore, wanted: str) -> int:
        for member in dict.fromkeys((wanted, self.mode.value)):
            for checkpoint in (False, True):  # the newest best policy; a run of checkpoints only: the newest one
                itr = _newest(store, member, checkpoint=checkpoint)
                if itr is not None:
                    return itr
        itrs = store.itrs()
        if not itrs:
            raise SnapshotNotFoundError(f"no snapshot committed at {store.url}: persist a policy first")
        return itrs[-1]  # it holds neither member: restore says which mode it was persisted in

    def get_save_best_fn(self, world: Any) -> Callable[[Any], None]:
        """A ``save_best_fn(policy)`` for tianshou's trainers: persists the policy each time it is called."""

        def save_best_fn(policy: Any) -> None:
            self.persist(policy, world)

        return save_best_fn

    def get_save_checkpoint_fn(self, world: Any) -> Callable[[int, int, int], str] | None:
        """A ``save_checkpoint_fn(epoch, env_step, gradient_step)`` for tianshou's trainers; None when disabled.

        Each call commits a checkpoint snapshot of ``world.algorithm`` (tianshou's world; this module's World:
        ``world.policy``) with the additional persistence's members and a ``"trainer"`` member holding the three
        counters, and returns the snapshot's URL. :meth:`restore_checkpoint` reads the newest one back.
        """
        if not self.enabled:
            return None

        def save_checkpoint_fn(epoch: int, env_step: int, gradient_step: int) -> str:
            target = self._runs.world(world, restoring=False)
            if target.policy is None:
                raise ValueError(
                    f"nothing to checkpoint to {target.store.url}: the world has no algorithm (tianshou's World) "
                    "or policy (bucketsnap's World): set it before the trainer runs"
                )
            counters = {"epoch": int(epoch), "env_step": int(env_step), "gradient_step": int(gradient_step)}
            info = self._commit(target, {**self._members(target.policy), TRAINER: counters}, f"checkpoint {counters}")
            return info.url

        return save_checkpoint_fn

    def restore_checkpoint(
        self, algorithm: Any, world: Any, device: MapLocation = None, *, location: str | SnapshotStore | None = None
    ) -> dict[str, int] | None:
        """Load the newest checkpoint into ``algorithm``; return its counters, or None when the run has none.

        The run is ``location``, else this persistence's, else the world's (tianshou's: ``persist_directory``,
        the run being resumed). The weights are read without pickle in both modes.
        """
        if location is not None:
            target = World(self._runs._store(location))
        elif isinstance(world, World):
            target = world
        else:
            target = self._runs.world(world, restoring=False)
        itr = _newest(target.store, TRAINER, checkpoint=True)
        if itr is None:
            return None
        snapshot = target.store.open(itr, map_location=device)
        algorithm.load_state_dict(snapshot[self.Mode.POLICY_STATE_DICT.value])
        target.snapshot, target.policy = snapshot, algorithm
        if self.additional_persistence is not None:
            self.additional_persistence.restore(RestoreEvent.RESTORE_POLICY, target)
        counters: dict[str, int] = snapshot[TRAINER]
        logger.info("restored checkpoint itr %d of %s: %s", itr, target.store.url, counters)
        return counters
