"""``Snapshotter``: garage's snapshotter (modes, gap, ``save_itr_params``, ``load``) over any fsspec URL.

garage writes ``itr_<N>.pkl`` files and, in ``"last"`` mode, overwrites ``params.pkl`` in place, so a crash
during the write leaves no loadable snapshot. Here each save is a committed bucketsnap snapshot, and a mode is
two things: which itrs are saved (``"gap"``: multiples of ``snapshot_gap``; ``"none"``: none) and which saved
snapshots are kept, a :mod:`bucketsnap.retention` policy the store applies after each commit
(``"last"``: ``KeepLast(1)``; ``"gap_and_last"``: ``KeepEvery(gap) | KeepLast(1)``). Because retention runs
after the commit, the previous snapshot leaves the manifest only once the new one is in it: at every instant
some snapshot is loadable.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

from bucketsnap._info import SnapshotInfo
from bucketsnap._manifest import MANIFEST_DIR, SNAPSHOT_DIR, parse_which
from bucketsnap._store import DATA_DIRS, SnapshotStore
from bucketsnap._values import MapLocation
from bucketsnap.errors import NotAFileError, SnapshotNotFoundError, StorageError
from bucketsnap.retention import garage_mode

__all__ = ["MODES", "Snapshotter"]

#: garage's snapshot modes.
MODES = ("all", "last", "gap", "gap_and_last", "none")

#: Loads of ``"last"``/``"first"`` retry this many times when the snapshot they resolved is deleted under them.
_LOAD_ATTEMPTS = 3


class Snapshotter:
    """Save training parameters every iteration, as garage's ``Snapshotter`` does, to any fsspec URL.

    Args:
        snapshot_dir: the run's URL or local path (``s3://bucket/exp``, ``memory://exp``, ``data/exp``...).
        snapshot_mode: ``"all"`` (every itr), ``"last"`` (only the newest is kept), ``"gap"`` (every
            ``snapshot_gap``-th itr, itr 0 included), ``"gap_and_last"`` (every gap-th plus the newest) or
            ``"none"`` (nothing is saved).
        snapshot_gap: the gap of the ``"gap"`` modes, an int >= 1.
        storage_options: passed to fsspec (credentials, ``endpoint_url``...), for saving and loading.

    Raises:
        ValueError: an unknown mode or a gap below 1 (garage raises only at the first save).

    Example:
        >>> snapshotter = Snapshotter("memory://doc/garage", snapshot_mode="last")
        >>> for itr in range(3):
        ...     _ = snapshotter.save_itr_params(itr, {"itr": itr, "w": [0.5] * 4})
        >>> snapshotter.load("memory://doc/garage")["itr"]
        2
        >>> snapshotter.store.itrs()
        [2]
    """

    def __init__(
        self,
        snapshot_dir: str,
        snapshot_mode: str = "last",
        snapshot_gap: int = 1,
        *,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        gap = _int(snapshot_gap, minimum=1)
        if gap is None:
            raise ValueError(f"snapshot_gap must be an int >= 1, not {snapshot_gap!r}")
        retention = garage_mode(snapshot_mode, gap)  # raises ValueError for an unknown mode
        self._snapshot_dir = snapshot_dir
        self._snapshot_mode = snapshot_mode
        self._snapshot_gap = gap
        self._storage_options = storage_options
        self._store = SnapshotStore(snapshot_dir, storage_options=storage_options, retention=retention)

    @property
    def snapshot_dir(self) -> str:
        """The URL snapshots are saved to, as given."""
        return self._snapshot_dir

    @property
    def snapshot_mode(self) -> str:
        """One of :data:`MODES`."""
        return self._snapshot_mode

    @property
    def snapshot_gap(self) -> int:
        """The gap of the ``"gap"`` modes."""
        return self._snapshot_gap

    @property
    def store(self) -> SnapshotStore:
        """The :class:`SnapshotStore` at ``snapshot_dir`` (with the mode's retention) that saves go through."""
        return self._store

    def __repr__(self) -> str:
        return (
            f"Snapshotter({self._store.url!r}, snapshot_mode={self._snapshot_mode!r}, "
            f"snapshot_gap={self._snapshot_gap})"
        )

    def save_itr_params(self, itr: int, params: Mapping[str, Any]) -> SnapshotInfo | None:
        """Save ``params`` as snapshot ``itr`` if the mode says so; return its info, or None if not saved.

        ``params`` is a dict; each top-level key becomes a member that can be loaded alone. Tensors, arrays and
        plain data are stored without pickle; other objects (an algorithm, an environment) are cloudpickled and
        need ``allow_pickle=True`` to load. Saving an itr again replaces it, as garage overwrites its file.

        Raises:
            ValueError: ``itr`` is not a non-negative int, or ``params`` is not a dict with str keys.
            StorageError: the backend failed; the previous snapshots are intact.
        """
        n = _int(itr, minimum=0)
        if n is None:
            raise ValueError(f"itr must be a non-negative int, not {itr!r}")
        mode = self._snapshot_mode
        if mode == "none" or (mode == "gap" and n % self._snapshot_gap != 0):
            return None
        if not isinstance(params, Mapping):
            raise ValueError(
                f"params must be a dict such as {{'algo': algo, 'env': env}}, not {type(params).__name__}; "
                "bucketsnap stores each key as a separately loadable member"
            )
        return self._store.save(n, params, overwrite=True)

    def load(
        self,
        load_dir: str,
        itr: int | str = "last",
        *,
        map_location: MapLocation = None,
        allow_pickle: bool = False,
    ) -> dict[str, Any]:
        """Load one snapshot of ``load_dir`` (any URL; this snapshotter's storage options apply).

        Args:
            load_dir: the run to load from.
            itr: ``"last"``, ``"first"``, an int itr, or a string of digits.
            map_location: as in ``torch.load``.
            allow_pickle: allow members that were cloudpickled (an algorithm object); code from the run executes.

        Returns:
            The saved params dict.

        Raises:
            ValueError: ``itr`` is none of the above.
            SnapshotNotFoundError: (a ``FileNotFoundError``) ``load_dir`` has no snapshots, or none with ``itr``.
            NotAFileError: ``load_dir`` holds something that is not a bucketsnap run (a plain file, or a
                directory of other files).
            UnsafeLoadError: a member is pickled and ``allow_pickle`` is False.
        """
        which = parse_which(itr, digits=True, name="itr")  # garage accepts "12" as well as 12
        store = SnapshotStore(load_dir, storage_options=self._storage_options)
        for attempt in range(_LOAD_ATTEMPTS):
            try:
                snapshot = store.open(which, map_location=map_location, allow_pickle=allow_pickle)
            except (SnapshotNotFoundError, StorageError):
                _check_is_run(store)
                raise
            try:
                return snapshot.load()
            except SnapshotNotFoundError:
                # Deleted while we read it (a concurrent delete or gc): "last"/"first" may name another now.
                if isinstance(which, int) or attempt == _LOAD_ATTEMPTS - 1:
                    raise
                if store.info(which).path == snapshot.info.path:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover


def _int(value: Any, *, minimum: int) -> int | None:
    """``value`` as an int if it is an integer (numpy's included, bool excluded) >= ``minimum``, else None."""
    if isinstance(value, bool):
        return None
    try:
        n = operator.index(value)
    except TypeError:
        return None
    return n if n >= minimum else None


def _check_is_run(store: SnapshotStore) -> None:
    """Raise NotAFileError if the URL holds something other than a bucketsnap run (or nothing)."""
    storage = store.storage
    try:
        is_file = storage.is_file()
    except StorageError:  # an unreachable backend: let the caller's own error speak
        return
    if is_file:
        raise NotAFileError(
            f"{store.url} is a file, not a bucketsnap run: pass the directory given to Snapshotter(snapshot_dir=...) "
            "(garage's params.pkl files are not bucketsnap snapshots)"
        )
    try:
        names = storage.list("")
    except StorageError:
        return
    foreign = sorted(set(names) - {MANIFEST_DIR, SNAPSHOT_DIR, *DATA_DIRS})
    if foreign and MANIFEST_DIR not in names:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise NotAFileError(
            f"{store.url} holds {len(foreign)} other object(s) ({shown}) but no bucketsnap manifest, so it is not "
            "a bucketsnap run; check the URL (a run holds manifest/ and snapshots/)"
        )
