"""A long-lived process for the gc fencing tests: saves, gc runs and reads, as commands on stdin.

Usage: gc_fencing_worker.py. Reads one JSON command per line on stdin and answers with JSON lines on stdout
(``{"event": ...}``); prints ``{"event": "ready", "time": time.time()}`` once imported. Commands (each carries
``url`` and ``options`` unless noted):

    save       itr, seed, rows, chunk_rows, keep_last (null: no retention), pause, at: saves :func:`make_state`
               (a replay buffer of ``rows`` rows in chunks of ``chunk_rows``, a tensor, an int). With ``pause``,
               the ``progress`` callback pauses the save between storing its chunks and committing: ``at``
               "last" (the default) on its last call (every byte of the state encoded into the archive), "first"
               on its first call (the chunks stored, the archive not started). It prints ``{"event": "paused"}``,
               then with ``pause="stop"`` sends this process SIGSTOP (the test SIGCONTs it); with ``pause="kill"``
               the save runs in a forked child that SIGKILLs itself there (a preempted VM), and this process
               answers ``killed`` with the child's status. Answers ``saved`` with the committed path, or ``failed``.
    gc         min_age: ``store.gc(min_age=...)``; answers ``gc`` with the removed paths, or ``failed``.
    open       itr: resolves the snapshot (``store.open``) and reads its ``policy`` member; answers ``opened``.
    read_rest  (no url) reads every other member of the snapshot opened last, and its buffer's chunks, without
               resolving it again; answers ``read`` with whether each value is exact, or ``failed``.
    clock      (no url) offset: sets libfaketime's ``FAKETIME`` (the process must run under libfaketime with
               ``FAKETIME_NO_CACHE=1``); answers ``clock`` with ``time.time()``.
    exit       (no url) ends the process.

``failed`` carries the exception's type name, whether it is a ``BucketsnapError``, its message and traceback.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any

import numpy as np
import torch

import bucketsnap
from bucketsnap._chunks import ChunkTable, read_chunks
from bucketsnap.buffers import TransitionStorage, buffer_state

BUFFER_KEY = "replay_buffer"
OBS_DIM = 128
POLICY_SIZE = 100_000

KILLED_TIMEOUT = 60.0

_lock = threading.Lock()


def emit(event: str, **fields: Any) -> None:
    with _lock:
        sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
        sys.stdout.flush()


def buffer_rows(seed: int, rows: int) -> dict[str, np.ndarray]:
    """The rows a deterministic training run with ``seed`` has in its buffer: same seed, same chunks."""
    rng = np.random.default_rng(seed)
    return {
        "obs": rng.random((rows, OBS_DIM), dtype=np.float32),
        "action": rng.integers(0, 6, rows, dtype=np.int64),
    }


def policy(seed: int) -> torch.Tensor:
    return torch.randn(POLICY_SIZE, generator=torch.Generator().manual_seed(seed))


def make_state(itr: int, seed: int, rows: int, chunk_rows: int) -> dict[str, Any]:
    storage = TransitionStorage(rows)
    storage.insert_data_slice({name: torch.from_numpy(a) for name, a in buffer_rows(seed, rows).items()})
    return {
        BUFFER_KEY: buffer_state(storage, chunk_rows=chunk_rows),
        "policy": policy(seed),
        "extra": torch.full((1000,), float(seed)),
        "itr": itr,
    }


def check_member(key: str, value: Any, itr: int, seed: int) -> bool:
    """Whether ``value`` is exactly what :func:`make_state` saved under ``key`` (the buffer's table aside)."""
    if key == "policy":
        return bool(torch.equal(value, policy(seed)))
    if key == "extra":
        return bool(torch.equal(value, torch.full((1000,), float(seed))))
    if key == "itr":
        return bool(value == itr)
    return key == BUFFER_KEY


def read_buffer(store_storage: Any, snapshot: Any, seed: int) -> bool:
    """Stream the buffer's chunks of an opened snapshot (no re-resolve: it may be dropped meanwhile)."""
    where = f"{snapshot.info.url} member {BUFFER_KEY!r}"
    table = ChunkTable.parse(snapshot[BUFFER_KEY], where)
    expected = buffer_rows(seed, table.rows)
    ok = True
    for start, rows in read_chunks(store_storage, table, where=where, verify=True):
        for name, array in rows.items():
            ok = ok and bool(np.array_equal(array, expected[name][start : start + len(array)]))
    return ok


class Worker:
    def __init__(self) -> None:
        self.opened: tuple[Any, Any, int] | None = None  # (store, snapshot, seed)

    def store(self, cmd: dict[str, Any]) -> bucketsnap.SnapshotStore:
        keep = cmd.get("keep_last")
        return bucketsnap.SnapshotStore(
            cmd["url"],
            storage_options=cmd.get("options") or {},
            retention=bucketsnap.KeepLast(keep) if keep else None,
        )

    def save(self, cmd: dict[str, Any]) -> None:
        if cmd.get("pause") != "kill":
            self._save(cmd)
            return
        pid = os.fork()
        if pid == 0:  # the child: killed at the pause; never returns into the command loop
            try:
                self._save(cmd)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(3)
        deadline = time.monotonic() + KILLED_TIMEOUT
        while (status := os.waitpid(pid, os.WNOHANG))[0] == 0:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise TimeoutError(f"the forked writer was still saving after {KILLED_TIMEOUT:.0f} s")
            time.sleep(0.01)
        code = status[1]
        emit("killed", itr=cmd["itr"], signal=os.WTERMSIG(code) if os.WIFSIGNALED(code) else None, status=code)

    def _save(self, cmd: dict[str, Any]) -> None:
        store = self.store(cmd)
        itr, pause, at = int(cmd["itr"]), cmd.get("pause"), cmd.get("at", "last")
        state = make_state(itr, int(cmd["seed"]), int(cmd["rows"]), int(cmd["chunk_rows"]))
        fired = False

        def progress(done: int, total: int) -> None:
            nonlocal fired
            if pause and not fired and total > 0 and (at == "first" or done >= total):
                fired = True
                emit("paused", itr=itr, pid=os.getpid(), time=time.time(), done=done, total=total)
                os.kill(os.getpid(), signal.SIGSTOP if pause == "stop" else signal.SIGKILL)

        info = store.save(itr, state, metrics={"seed": int(cmd["seed"])}, progress=progress)
        emit("saved", itr=itr, path=info.path, refs=list(info.refs), paused=fired)

    def gc(self, cmd: dict[str, Any]) -> None:
        removed = self.store(cmd).gc(min_age=float(cmd["min_age"]))
        emit("gc", removed=removed, time=time.time())

    def clock(self, cmd: dict[str, Any]) -> None:
        os.environ["FAKETIME"] = str(cmd["offset"])  # libfaketime re-reads it with FAKETIME_NO_CACHE=1
        emit("clock", time=time.time())

    def open(self, cmd: dict[str, Any]) -> None:
        store = self.store(cmd)
        snapshot = store.open(int(cmd["itr"]))
        seed = int(str(snapshot.info.metrics["seed"]))
        ok = check_member("policy", snapshot["policy"], snapshot.info.itr, seed)
        self.opened = (store, snapshot, seed)
        emit("opened", itr=snapshot.info.itr, path=snapshot.info.path, exact=ok)

    def read_rest(self, cmd: dict[str, Any]) -> None:
        assert self.opened is not None, "read_rest before open"
        store, snapshot, seed = self.opened
        exact = {key: check_member(key, snapshot[key], snapshot.info.itr, seed) for key in snapshot if key != "policy"}
        exact["chunks"] = read_buffer(store.storage, snapshot, seed)
        emit("read", exact=exact)


def main() -> None:
    torch.set_num_threads(1)  # no OpenMP pool, so that a forked child can compute safely
    worker = Worker()
    emit("ready", pid=os.getpid(), time=time.time())
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "exit":
            return
        try:
            getattr(worker, op)(cmd)
        except Exception as exc:
            emit(
                "failed",
                op=op,
                itr=cmd.get("itr"),
                type=type(exc).__name__,
                bucketsnap=isinstance(exc, bucketsnap.BucketsnapError),
                message=str(exc)[:2000],
                traceback=traceback.format_exc()[-4000:],
            )


if __name__ == "__main__":
    main()
