"""The training process the preemption helper starts: the user's entry point, with bucketsnap instrumented.

Started by ``_preempt.CHILD_CODE``, which calls :func:`main` with the path of a JSON file saying what to run
and when to signal. Before the entry point runs, a few of bucketsnap's own methods are wrapped, in this process
only:

* ``Committer.commit`` reports each committed snapshot (``committed``);
* ``SnapshotStore.open`` reports which snapshot a resume found (``opened``, None on an empty run);
* ``Storage.write`` of a save's archive reports it (``writing``) when all its bytes are written and before it
  is published;
* for a ``memory://`` run, ``Storage.write``, ``create_exclusive`` and ``delete`` under the run are journaled
  (:mod:`bucketsnap.testing._shared`).

At the moment the test chose (the n-th commit, or the n-th save's archive written but unpublished) the
process sends itself the signal, from the thread that reached that moment, and carries on as the signal
allows: SIGKILL ends it there, SIGTERM is handled by whatever the script installed (``on_preemption`` defers it
until the save in progress is done). Sending it from inside makes the moment exact instead of a race with a
process watching from outside; to the process it is the same signal. Events go, one JSON line each, to a file
that outlives the process.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import runpy
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from bucketsnap._commit import Committer
from bucketsnap._info import SnapshotInfo
from bucketsnap._manifest import Manifest
from bucketsnap._pipeline import _Run
from bucketsnap._progress import ProgressCallback
from bucketsnap._saving import Prepared
from bucketsnap._snapshot import Snapshot
from bucketsnap._storage import Storage
from bucketsnap._store import SnapshotStore
from bucketsnap.errors import SnapshotNotFoundError
from bucketsnap.testing._shared import Journal, replay

__all__ = ["main"]


class _Hooks:
    """The wrapped methods' shared state: the counts, the moment, the event file and the journal."""

    def __init__(self, control: dict[str, Any]) -> None:
        moment = control.get("moment") or {}
        self.kind: str | None = moment.get("kind")
        self.n: int = int(moment.get("n", 0))
        self.signum: int = int(control.get("signal") or 0)
        self._events = os.open(control["events"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        share = control.get("share") or {}
        self.share_url: str | None = share.get("url")
        self.journal = Journal(share["journal"]) if share else None
        self._lock = threading.Lock()
        self._counts = {"commit": 0, "save": 0}
        self._fired = False
        self.saving = threading.local()  # the save this thread is writing, if any

    def emit(self, **event: Any) -> None:
        line = (json.dumps(event) + "\n").encode()
        with self._lock:
            os.write(self._events, line)

    def reached(self, kind: str, committed: Any) -> None:
        """One more ``kind`` happened; at the chosen one, send the signal (``committed``: the run's itrs now)."""
        with self._lock:
            self._counts[kind] += 1
            fire = not self._fired and kind == self.kind and self._counts[kind] == self.n
            self._fired = self._fired or fire
        if fire:
            self.emit(event="signal", signal=self.signum, committed=committed())
            os.kill(os.getpid(), self.signum)

    # -- the memory journal ---------------------------------------------------------------------------------

    def shared_rel(self, storage: Storage, rel: str) -> str | None:
        """``rel`` of ``storage`` relative to the carried run, or None if it lies elsewhere."""
        if self.share_url is None:
            return None
        url = storage.url_of(rel)
        prefix = self.share_url.rstrip("/") + "/"
        return url[len(prefix) :] if url.startswith(prefix) else None

    def journal_put(self, storage: Storage, rel: str, data: bytes | None = None) -> None:
        shared = self.shared_rel(storage, rel)
        if shared is not None and self.journal is not None:
            self.journal.put(shared, storage.read(rel) if data is None else data)

    def journal_delete(self, storage: Storage, rel: str) -> None:
        shared = self.shared_rel(storage, rel)
        if shared is not None and self.journal is not None:
            self.journal.delete(shared)

    # -- installing -------------------------------------------------------------------------------------------

    def install(self) -> None:
        hooks = self
        commit, run_write = Committer.commit, _Run.write
        storage_write, create_exclusive, delete = Storage.write, Storage.create_exclusive, Storage.delete
        store_open = SnapshotStore.open

        def committer_commit(
            committer: Committer, info: SnapshotInfo, base: Manifest, *, overwrite: bool, written: list[str]
        ) -> Manifest:
            committed = commit(committer, info, base, overwrite=overwrite, written=written)
            hooks.emit(event="committed", itr=info.itr)
            hooks.reached("commit", lambda: committer.log.read().itrs())
            return committed

        def save_write(run: _Run, prepared: Prepared, progress: ProgressCallback | None) -> dict[str, Any]:
            hooks.saving.run = run
            try:
                return run_write(run, prepared, progress)
            finally:
                hooks.saving.run = None

        @contextlib.contextmanager
        def write(storage: Storage, rel: str) -> Iterator[IO[bytes]]:
            with storage_write(storage, rel) as f:
                yield f
                run = getattr(hooks.saving, "run", None)
                if run is not None and rel == run.path:  # the save's archive, written, not yet published
                    itr = run.leader.get("itr")
                    hooks.emit(event="writing", itr=itr)
                    hooks.reached("save", lambda: run.pipeline.commits.log.read().itrs())
            hooks.journal_put(storage, rel)

        def storage_create_exclusive(storage: Storage, rel: str, data: bytes) -> None:
            create_exclusive(storage, rel, data)
            hooks.journal_put(storage, rel, data)

        def storage_delete(storage: Storage, rel: str) -> None:
            delete(storage, rel)
            hooks.journal_delete(storage, rel)

        def open_snapshot(store: SnapshotStore, which: Any = "last", **kwargs: Any) -> Snapshot:
            try:
                snapshot = store_open(store, which, **kwargs)
            except SnapshotNotFoundError:
                hooks.emit(event="opened", which=str(which), itr=None)
                raise
            hooks.emit(event="opened", which=str(which), itr=snapshot.info.itr)
            return snapshot

        wrapped: list[tuple[type, str, Any]] = [
            (Committer, "commit", committer_commit),
            (_Run, "write", save_write),
            (Storage, "write", write),
            (Storage, "create_exclusive", storage_create_exclusive),
            (Storage, "delete", storage_delete),
            (SnapshotStore, "open", open_snapshot),
        ]
        for cls, name, wrapper in wrapped:
            setattr(cls, name, wrapper)


def _run_entry(entry: str, args: list[str]) -> None:
    """Run ``entry`` as ``python`` would: a script path, ``package.module``, or ``package.module:function``."""
    if entry.endswith(".py") or os.path.isfile(entry):
        path = os.path.abspath(entry)
        sys.argv = [entry, *args]
        sys.path[0] = os.path.dirname(path)  # as `python script.py` has it
        runpy.run_path(path, run_name="__main__")
    elif ":" in entry:
        module, _, function = entry.partition(":")
        sys.argv = [module, *args]
        getattr(importlib.import_module(module), function)()
    else:
        sys.argv = [entry, *args]
        runpy.run_module(entry, run_name="__main__", alter_sys=True)


def main(control_path: str) -> None:
    """Seed a carried memory run, install the hooks, run the entry point."""
    control = json.loads(Path(control_path).read_text())
    share = control.get("share")
    if share:
        replay(Storage(share["url"]), share["seed"])
    hooks = _Hooks(control)
    hooks.install()
    hooks.emit(event="started", pid=os.getpid())
    _run_entry(control["entry"], list(control["args"]))
