"""``resume``: one call at the top of a training script that continues where the last run stopped."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from bucketsnap._store import SnapshotStore, as_store
from bucketsnap._values import MapLocation
from bucketsnap.errors import SnapshotNotFoundError

__all__ = ["Resumed", "resume"]


class Resumed(NamedTuple):
    """What :func:`resume` found: unpack it as ``itr, state = resume(...)``.

    Attributes:
        itr: the itr of the snapshot restored, or None on a fresh run.
        state: the restored state (defaults filled in for keys the snapshot lacks), or the defaults.
    """

    itr: int | None
    state: dict[str, Any]

    @property
    def next_itr(self) -> int:
        """The first itr still to run: 0 on a fresh run, else the restored itr plus one."""
        return 0 if self.itr is None else self.itr + 1


def resume(
    url_or_store: str | SnapshotStore,
    default_state: Mapping[str, Any],
    *,
    storage_options: dict[str, Any] | None = None,
    map_location: MapLocation = None,
    allow_pickle: bool = False,
) -> Resumed:
    """Restore the last committed snapshot, or return ``default_state`` on a fresh run.

    Example:
        >>> itr, state = resume("memory://doc/resume-run", {"step": 0})
        >>> itr, state
        (None, {'step': 0})
    """
    store = as_store(url_or_store, storage_options=storage_options)
    try:
        snapshot = store.open("last", map_location=map_location, allow_pickle=allow_pickle)
    except SnapshotNotFoundError:  # raised by the manifest lookup only: the run is empty
        return Resumed(None, dict(default_state))
    return Resumed(snapshot.info.itr, {**default_state, **snapshot.load()})
