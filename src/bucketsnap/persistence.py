"""tianshou-style persistence: ``PersistEvent``, ``RestoreEvent``, ``Persistence``, ``PersistenceGroup`` and
``PolicyPersistence``, writing bucketsnap snapshots instead of files in a directory.

tianshou's ``PolicyPersistence`` ``torch.save``-s the policy to ``<dir>/policy.pt`` and then lets an additional
persistence write its own files beside it. Here one persist is one committed snapshot: the policy is the member
named after the mode (``"policy"`` or ``"policy_state_dict"``), and additional persistences add their own members
to ``world.members`` before the commit, so the policy and what goes with it (observation normalisation, say)
are committed together or not at all. On restore, the snapshot is opened lazily as ``world.snapshot``; each
persistence reads only its own members.

The :class:`World` is deliberately small: the run, the policy, the itr and the members being persisted; tianshou's
``World`` (trainer, envs, logger...) is not needed to persist a policy.
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
            (None: the last).
        metrics: saved as the snapshot's metrics (a best return, for ``retention=KeepBest(...)``).
        storage_options: passed to fsspec when ``location`` is a URL.
        members: while persisting, the state the snapshot will hold: persistences add their members here.
        snapshot: while restoring, the snapshot being restored from (members are read when indexed).
        store: the :class:`SnapshotStore` at ``location``.
    """

    location: str | SnapshotStore
    policy: Any = None
    itr: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    storage_options: dict[str, Any] | None = field(default=None, repr=False)
    members: dict[str, Any] = field(default_factory=dict, repr=False)
    snapshot: Snapshot | None = field(default=None, repr=False)
    store: SnapshotStore = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.store = as_store(self.location, storage_options=self.storage_options)

    def open_snapshot(self, *, map_location: MapLocation = None, allow_pickle: bool = False) -> Snapshot:
        """Open snapshot ``itr`` (the last if None) lazily, and remember it as :attr:`snapshot`."""
        self.snapshot = self.store.open(
            "last" if self.itr is None else self.itr, map_location=map_location, allow_pickle=allow_pickle
        )
        return self.snapshot


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
    """

    def __init__(self, key: str, obj: Any) -> None:
        self.key = key
        self.obj = obj

    def persist(self, event: PersistEvent, world: World) -> None:
        world.members[self.key] = self.obj.state_dict()

    def restore(self, event: RestoreEvent, world: World) -> None:
        snapshot = world.snapshot if world.snapshot is not None else world.open_snapshot()
        self.obj.load_state_dict(snapshot[self.key])


class PolicyPersistence:
    """Handles persistence of the policy: each :meth:`persist` commits one snapshot.

    Args:
        additional_persistence: a persistence invoked whenever this object persists or restores, to add its
            members to the same snapshot or read them from it.
        enabled: whether persisting is enabled (restoring always is).
        mode: :attr:`Mode.POLICY` (the default, as in tianshou) or :attr:`Mode.POLICY_STATE_DICT`.

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
        """Persist the entire policy, cloudpickled: restorable without constructing it, but loading executes
        code from the snapshot (``allow_pickle=True``), and breaks when the policy's class is renamed or moved."""

    def __init__(
        self,
        additional_persistence: Persistence | None = None,
        enabled: bool = True,
        mode: PolicyPersistence.Mode = Mode.POLICY,
    ) -> None:
        self.additional_persistence = additional_persistence
        self.enabled = enabled
        self.mode = mode

    def persist(self, policy: Any, world: World) -> SnapshotInfo | None:
        """Commit a snapshot of ``policy`` (and the additional persistence's members); None when disabled.

        Raises:
            StorageError: the backend failed; nothing was committed.
        """
        if not self.enabled:
            return None
        world.policy = policy
        world.members = {self.mode.value: policy.state_dict() if self.mode is self.Mode.POLICY_STATE_DICT else policy}
        if self.additional_persistence is not None:
            self.additional_persistence.persist(PersistEvent.PERSIST_POLICY, world)
        store = world.store
        if world.itr is None:
            itrs = store.itrs()
            itr, overwrite = (itrs[-1] + 1 if itrs else 0), False
        else:
            itr, overwrite = world.itr, True  # an explicit itr is replaced, as tianshou overwrites its file
        info = store.save(itr, world.members, metrics=world.metrics, overwrite=overwrite)
        logger.info("persisted policy (%s) as itr %d of %s", self.mode.value, itr, store.url)
        return info

    def restore(
        self,
        policy: Any,
        world: World,
        *,
        map_location: MapLocation = None,
        allow_pickle: bool = False,
    ) -> Any:
        """Restore the policy from snapshot ``world.itr`` (the last if None) and return it.

        Args:
            policy: the policy to load the weights into, or None in :attr:`Mode.POLICY` to get the unpickled one.
            world: the world; its ``policy`` and ``snapshot`` are set.
            map_location: as in ``torch.load`` (tianshou's ``device``).
            allow_pickle: required in :attr:`Mode.POLICY`; the snapshot's code runs.

        Raises:
            SnapshotNotFoundError: no such snapshot.
            UnsafeLoadError: :attr:`Mode.POLICY` without ``allow_pickle=True``.
            ValueError: :attr:`Mode.POLICY_STATE_DICT` without a policy, or the snapshot holds the other mode.
        """
        if policy is None and self.mode is self.Mode.POLICY_STATE_DICT:
            raise ValueError(
                "Mode.POLICY_STATE_DICT restores weights into an existing policy: construct a structurally equal "
                "policy and pass it, or persist with Mode.POLICY"
            )
        snapshot = world.open_snapshot(map_location=map_location, allow_pickle=allow_pickle)
        name = self.mode.value
        if name not in snapshot:
            raise ValueError(
                f"snapshot itr {snapshot.info.itr} at {world.store.url} has no {name!r} member (it has "
                f"{list(snapshot)}): it was persisted in another mode; restore with "
                "PolicyPersistence(mode=...) set to the mode it was persisted with"
            )
        loaded = snapshot[name]
        if self.mode is self.Mode.POLICY_STATE_DICT:
            policy.load_state_dict(loaded)
        elif policy is None:
            policy = loaded
        else:
            policy.load_state_dict(loaded.state_dict())
        world.policy = policy
        if self.additional_persistence is not None:
            self.additional_persistence.restore(RestoreEvent.RESTORE_POLICY, world)
        return policy

    def get_save_best_fn(self, world: World) -> Callable[[Any], None]:
        """A ``save_best_fn(policy)`` for tianshou's trainers: persists the policy each time it is called."""

        def save_best_fn(policy: Any) -> None:
            self.persist(policy, world)

        return save_best_fn
