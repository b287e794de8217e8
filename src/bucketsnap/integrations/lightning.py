"""Lightning: a ``CheckpointIO`` that keeps every checkpoint as a committed snapshot in a bucketsnap run.

::

    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint
    from bucketsnap.integrations.lightning import BucketsnapCheckpointIO

    checkpoints = BucketsnapCheckpointIO("s3://bucket/runs/exp1")
    trainer = Trainer(plugins=[checkpoints], callbacks=[ModelCheckpoint(dirpath="checkpoints", save_top_k=2,
                                                                        monitor="val_loss", save_last=True)])
    trainer.fit(model, ckpt_path="last")  # resumes after a preemption, on this machine or a fresh one

Lightning's ``ModelCheckpoint`` decides *which* checkpoints exist (its file names, top-k, ``last.ckpt``,
``best_model_path``) and looks for them on its ``dirpath`` with fsspec; this plugin decides *where the bytes go*:
each ``save_checkpoint`` is one atomic commit to the run (the checkpoint's top-level keys are its members, its
file path recorded in the metric ``lightning.path``), and the file at the path is only a *pointer*, a few bytes of
JSON naming the run and the snapshot. Constructing the plugin writes the pointers of every checkpoint the run holds
that are missing (a fresh machine after a preemption), dated when the checkpoint was saved, so that
``ckpt_path="last"``, ``"best"`` and explicit paths find them as Lightning always does. ``remove_checkpoint``
(top-k pruning) drops the snapshot through the commit log, and never the one this process resumed from.
A file at a checkpoint path that is not a pointer (a checkpoint Lightning wrote before) is loaded as Lightning's
own ``TorchCheckpointIO`` would, so a run can move to bucketsnap mid-way.
"""

from __future__ import annotations

import json
import os
import re
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

try:
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("bucketsnap.integrations.lightning needs lightning: pip install 'bucketsnap[lightning]'") from exc

from bucketsnap._info import SnapshotInfo
from bucketsnap._store import SnapshotStore, as_store
from bucketsnap.errors import SnapshotNotFoundError

__all__ = ["BucketsnapCheckpointIO", "PATH_METRIC"]

#: The metric recording, on each snapshot, the checkpoint path Lightning saved it under.
PATH_METRIC = "lightning.path"
_POINTER_FORMAT = "bucketsnap-lightning-pointer"
#: Checkpoint keys that are not valid member names are kept together in this member.
_OTHER_KEYS = "_lightning_other_keys"
_MEMBER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}$")


class BucketsnapCheckpointIO(CheckpointIO):
    """Lightning's checkpoint I/O through a bucketsnap run at ``url_or_store`` (any URL bucketsnap takes).

    Args:
        url_or_store: the run's URL, or a :class:`~bucketsnap.SnapshotStore`.
        storage_options: fsspec options for a URL (credentials, endpoint).
        allow_pickle: let loads unpickle the values bucketsnap could only store pickled (objects in a module's
            ``hyper_parameters`` that are not plain data); off by default, and then such a load raises
            :class:`~bucketsnap.errors.UnsafeLoadError` naming the member.
        write_pointers: write each checkpoint's pointer file at its path (and the missing ones on construction).
            Without them ``ModelCheckpoint`` cannot find checkpoints by listing its ``dirpath``; loads by path
            still work, from the run alone.

    A snapshot's itr is one more than the run's newest, so checkpoints Lightning saves at the same step (a top-k
    file and ``last.ckpt``) are separate snapshots; ``epoch`` and ``global_step`` are recorded as metrics.
    Saving to a path that already holds a checkpoint (``last.ckpt`` each epoch) commits the new one first and
    then deletes the one it replaces.
    """

    def __init__(
        self,
        url_or_store: str | SnapshotStore,
        *,
        storage_options: dict[str, Any] | None = None,
        allow_pickle: bool = False,
        write_pointers: bool = True,
    ) -> None:
        self.store = as_store(url_or_store, storage_options=storage_options)
        self.allow_pickle = allow_pickle
        self.write_pointers = write_pointers
        self._lock = threading.Lock()
        self._resumed_from: int | None = None
        if write_pointers:
            self.restore_pointers()

    def __repr__(self) -> str:
        return f"BucketsnapCheckpointIO({self.store.url!r})"

    # -- Lightning's CheckpointIO -------------------------------------------------------------------------------

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Commit ``checkpoint`` as a new snapshot recorded under ``path``, then write the pointer file there."""
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__}.save_checkpoint takes no storage_options (got {storage_options!r}): "
                "give them to BucketsnapCheckpointIO(url, storage_options=...)"
            )
        name = _name(path)
        state = _members(checkpoint)
        metrics: dict[str, Any] = {PATH_METRIC: name}
        for key in ("epoch", "global_step"):
            if isinstance(checkpoint.get(key), int):
                metrics[key] = checkpoint[key]
        with self._lock:
            replaced = [info.itr for info in self._infos() if info.metrics.get(PATH_METRIC) == name]
            itrs = self.store.itrs()
            info = self.store.save((itrs[-1] + 1) if itrs else 0, state, metrics=metrics)
            if self.write_pointers:
                self._write_pointer(name, info)
            for itr in replaced:  # superseded by the commit above, so even the one resumed from can go
                self.store.delete(itr)
                if itr == self._resumed_from:
                    self._resumed_from = info.itr

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> Any:
        """The checkpoint saved under ``path`` (found through its pointer file, or else by its recorded path)."""
        name = _name(path)
        itr = self._itr_of(name)
        if itr is None:
            if _is_local(name) and os.path.isfile(name):  # a checkpoint Lightning itself wrote
                return TorchCheckpointIO().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
            raise SnapshotNotFoundError(
                f"{self.store.url} holds no checkpoint saved as {name!r}: "
                f"list them with `bucketsnap ls {self.store.url}`"
            )
        loaded = self.store.load(itr, map_location=map_location, allow_pickle=self.allow_pickle)
        self._resumed_from = itr
        other = loaded.pop(_OTHER_KEYS, {})
        return {**loaded, **other}

    def remove_checkpoint(self, path: Any) -> None:
        """Drop the checkpoint saved under ``path`` from the run (not the one this process loaded), and its pointer."""
        name = _name(path)
        with self._lock:
            kept = False
            for info in self._infos():
                if info.metrics.get(PATH_METRIC) == name:
                    if info.itr == self._resumed_from:
                        kept = True
                    else:
                        self.store.delete(info.itr)
            if not kept and self.write_pointers and _is_local(name) and self._pointer(name) is not None:
                os.remove(name)

    def teardown(self) -> None:
        self.store.flush()

    # -- pointers ------------------------------------------------------------------------------------------------

    def restore_pointers(self) -> list[str]:
        """Write the pointer files of the run's checkpoints that have none (dated when each was saved), remove
        those of this run whose snapshot is gone; return the paths written."""
        newest: dict[str, SnapshotInfo] = {}
        for info in self._infos():  # ascending itr: the newest checkpoint saved under a path wins
            name = info.metrics.get(PATH_METRIC)
            if isinstance(name, str) and _is_local(name):
                newest[name] = info
        written = []
        for name, info in newest.items():
            if not os.path.lexists(name):
                self._write_pointer(name, info)
                written.append(name)
        return written

    def _write_pointer(self, name: str, info: SnapshotInfo) -> None:
        if not _is_local(name):
            return
        pointer = {"format": _POINTER_FORMAT, "run": self.store.url, "itr": info.itr}
        target = Path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f".{target.name}.bucketsnap-tmp")
        temp.write_text(json.dumps(pointer) + "\n")
        stamp = _timestamp(info.created)
        os.utime(temp, (stamp, stamp))
        os.replace(temp, target)

    def _pointer(self, name: str) -> dict[str, Any] | None:
        """The pointer file at ``name`` if it is one of this run's, else None."""
        try:
            with open(name, "rb") as f:
                head = f.read(4096)
            pointer = json.loads(head)
        except (OSError, ValueError):
            return None
        if (
            isinstance(pointer, dict)
            and pointer.get("format") == _POINTER_FORMAT
            and pointer.get("run") == self.store.url
        ):
            return pointer
        return None

    def _itr_of(self, name: str) -> int | None:
        """The snapshot of the checkpoint at ``name``: the one its pointer names (through a symlink, as
        ``save_last="link"`` makes), else the newest saved under that path."""
        pointer = self._pointer(name) if _is_local(name) else None
        infos = self._infos()
        if pointer is not None:
            names = {name, os.path.realpath(name)}
            match = [i.itr for i in infos if i.itr == pointer.get("itr") and i.metrics.get(PATH_METRIC) in names]
            if match:
                return match[0]
        named = [i.itr for i in infos if i.metrics.get(PATH_METRIC) == name]
        return named[-1] if named else None

    def _infos(self) -> list[SnapshotInfo]:
        return self.store.infos()


def _members(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's top-level keys as members (those that are not valid member names kept together)."""
    state = {k: v for k, v in checkpoint.items() if isinstance(k, str) and _MEMBER.match(k) and k != _OTHER_KEYS}
    other = {k: v for k, v in checkpoint.items() if k not in state}
    if other:
        state[_OTHER_KEYS] = other
    return state


def _name(path: Any) -> str:
    text = os.fspath(path) if not isinstance(path, str) else path
    return os.path.abspath(text) if _is_local(text) else text


def _is_local(name: str) -> bool:
    return "://" not in name


def _timestamp(created: datetime) -> float:
    return created.timestamp()
