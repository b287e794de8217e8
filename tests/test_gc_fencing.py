"""gc against saves in flight, with real processes: no pause, reuse of stored chunks or clock skew lets gc delete
an object that a snapshot then commits (issue 12, item 2).

Every scenario ends with the same check of the guarantee: each committed itr verifies and loads exactly (its
buffer too, chunk by chunk); a save that returned success is committed; a save that failed raised a
``BucketsnapError``. A paused writer may thus either commit a snapshot that verifies or fail cleanly; which of the
two is up to the implementation. The writer pauses itself from its ``progress`` callback, on the last call (every
byte of the state encoded: its chunks are stored, its archive written, its commit still to come); see
``workers/gc_fencing_worker.py``. Clocks are skewed with Debian's libfaketime (``scripts/test.sh`` installs it).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import psutil
import pytest
import torch

from bucketsnap import SnapshotStore
from bucketsnap._chunks import CHUNK_DIR
from bucketsnap.buffers import TransitionStorage, restore_buffer
from conftest import Backend
from workers.gc_fencing_worker import BUFFER_KEY, buffer_rows, make_state, policy

WORKER = str(Path(__file__).parent / "workers" / "gc_fencing_worker.py")
#: Where Debian's libfaketime package puts the library (the multiarch directory varies with the machine).
LIBFAKETIME_GLOBS = ("/usr/lib/*/faketime/libfaketime.so.1", "/usr/lib/faketime/libfaketime.so.1")
ROWS, CHUNK_ROWS = 4096, 1024  # 2 MiB of rows in 4 chunks
CHUNKS = ROWS // CHUNK_ROWS
TIMEOUT = 60.0  # for any one answer of a worker


def libfaketime() -> str:
    found = sorted(str(p) for pattern in LIBFAKETIME_GLOBS for p in Path("/").glob(pattern.lstrip("/")))
    if not found:
        pytest.fail(
            f"libfaketime not found ({', '.join(LIBFAKETIME_GLOBS)}): install Debian's faketime package "
            "(scripts/test.sh does)"
        )
    return found[0]


class Worker:
    """A ``gc_fencing_worker.py`` process: JSON commands in, JSON events out (read by a thread, with timeouts).

    With ``skewed``, it runs under libfaketime and its clock can be set per test (:meth:`set_clock`).
    """

    def __init__(self, name: str, *, skewed: bool = False) -> None:
        self.name = name
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if skewed:
            preload = " ".join(p for p in (libfaketime(), env.get("LD_PRELOAD", "")) if p)
            # FAKETIME is re-read on every call, so the worker can change it; monotonic clocks stay true.
            env.update(LD_PRELOAD=preload, FAKETIME="+0", FAKETIME_NO_CACHE="1", FAKETIME_DONT_FAKE_MONOTONIC="1")
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 -- closed by close()
        self.proc = subprocess.Popen(
            [sys.executable, WORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=env,
        )
        self.pending = 0  # commands sent and not answered yet
        self._ready = False
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"{name}-stdout", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def ready(self) -> Worker:
        if not self._ready:
            event = self.expect("ready", final=False)
            assert abs(event["time"] - time.time()) < 60, f"{self.name} starts with a clock that is off"
            self._ready = True
        return self

    def set_clock(self, offset: str) -> None:
        """Run this worker's clock ``offset`` (libfaketime syntax: "+2h", "-2h") from the true time; check it."""
        hours = float(offset.rstrip("h"))
        event = self.call("clock", "clock", offset=offset)
        off = event["time"] - time.time()
        assert abs(off - hours * 3600) < 60, (
            f"{self.name}: FAKETIME={offset} gave a clock {off:+.0f} s off (libfaketime did not take effect)"
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, op: str, **fields: Any) -> None:
        assert self.proc.stdin is not None
        if op != "exit":
            self.pending += 1
        self.proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.proc.stdin.flush()

    def expect(self, *events: str, timeout: float = TIMEOUT, final: bool = True) -> dict[str, Any]:
        """The next event, which must be one of ``events``."""
        wanted = "/".join(events)
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"{self.name}: no {wanted} within {timeout:.0f} s ({self.state()}){self.stderr()}"
            ) from None
        if line is None:
            self.proc.wait(10)
            raise AssertionError(f"{self.name} exited with {self.proc.returncode} before {wanted}{self.stderr()}")
        event: dict[str, Any] = json.loads(line)
        if event["event"] not in events:
            raise AssertionError(f"{self.name}: expected {wanted}, got {event}{self.stderr()}")
        if final:
            self.pending -= 1
        return event

    def call(self, op: str, answer: str, **fields: Any) -> dict[str, Any]:
        """Run a command that must succeed; its answer."""
        self.send(op, **fields)
        event = self.expect(answer, "failed")
        assert event["event"] == answer, f"{self.name}: {op} failed: {event['traceback']}{self.stderr()}"
        return event

    def wait_stopped(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.state() != psutil.STATUS_STOPPED:
            assert time.monotonic() < deadline, f"{self.name} said it paused but is {self.state()}{self.stderr()}"
            time.sleep(0.01)

    def state(self) -> str:
        try:
            return str(psutil.Process(self.proc.pid).status())
        except psutil.NoSuchProcess:
            return f"exited with {self.proc.poll()}"

    def resume(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGCONT)

    def stderr(self) -> str:
        self._stderr.seek(0)
        text = self._stderr.read().decode(errors="replace")[-6000:]
        return f"\n--- {self.name} stderr ---\n{text}" if text.strip() else ""

    def close(self) -> None:
        """Ask it to exit (killing it if it does not at once); release its pipes."""
        if self.alive():
            self.resume()
            with contextlib.suppress(OSError, ValueError):
                self.send("exit")  # after Pool.close's exit, never read
            try:
                self.proc.wait(5 if self.pending == 0 else 0.1)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError, ValueError):
                    pipe.close()
        self._reader.join(10)
        self._stderr.close()


class Pool:
    """The two workers, kept across this module's tests (each costs seconds of imports): ``plain`` with the
    true clock, ``skewed`` under libfaketime. A test that leaves one busy, stopped or dead gets it replaced."""

    def __init__(self) -> None:
        self.workers: dict[str, Worker] = {}
        self.used: set[str] = set()

    def get(self, *names: str) -> list[Worker]:
        """The workers ``names``, those not running started at once."""
        for name in names:
            if name not in self.workers or not self.workers[name].alive():
                self.workers[name] = Worker(name, skewed=name == "skewed")
        self.used.update(names)
        return [self.workers[name].ready() for name in names]

    def settle(self) -> None:
        for name in self.used:
            worker = self.workers[name]
            if worker.pending or not worker.alive() or worker.state() == psutil.STATUS_STOPPED:
                worker.close()
                del self.workers[name]
        self.used.clear()

    def close(self) -> None:
        for worker in self.workers.values():  # all at once: each takes a moment to exit
            with contextlib.suppress(OSError, ValueError):
                worker.send("exit")
        for worker in self.workers.values():
            worker.close()


@pytest.fixture(scope="module")
def _pool() -> Iterator[Pool]:
    pool = Pool()
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def pool(_pool: Pool) -> Iterator[Pool]:
    try:
        yield _pool
    finally:
        _pool.settle()


def backend_params(*names: str) -> list[Any]:
    return [pytest.param(n, marks=[getattr(pytest.mark, n)] if n in ("s3", "gcs") else [], id=n) for n in names]


@pytest.fixture
def named_backend(request: pytest.FixtureRequest) -> Backend:
    return request.getfixturevalue(f"{request.param}_backend")  # type: ignore[no-any-return]


# -- the guarantee ---------------------------------------------------------------------------------------------


def violations(store: SnapshotStore, outcomes: list[dict[str, Any]]) -> list[str]:
    """What breaks the guarantee: committed itrs that do not verify or load exactly, saves that returned success
    and are not committed, saves that failed with an error other than a ``BucketsnapError``."""
    problems = []
    infos = {info.itr: info for info in store.infos()}
    for itr, info in infos.items():
        try:
            snapshot = store.open(itr)
            snapshot.verify()
            seed = int(str(info.metrics["seed"]))
            state = snapshot.load()
            assert torch.equal(state["policy"], policy(seed)), "policy differs"
            assert torch.equal(state["extra"], torch.full((1000,), float(seed))), "extra differs"
            assert state["itr"] == itr, f"its itr member is {state['itr']}"
            restored = restore_buffer(store, TransitionStorage(ROWS), key=BUFFER_KEY, which=itr, verify=True)
            for name, rows in buffer_rows(seed, ROWS).items():
                assert np.array_equal(restored.data[name].numpy(), rows), f"buffer field {name} differs"
        except Exception as exc:
            problems.append(f"committed itr {itr} does not verify and load: {type(exc).__name__}: {exc}")
    for outcome in outcomes:
        itr = outcome["itr"]
        if outcome["event"] == "saved":
            if itr not in infos:
                problems.append(f"the save of itr {itr} returned success, yet it is not committed ({sorted(infos)})")
            elif infos[itr].path != outcome["path"]:
                problems.append(f"the save of itr {itr} returned {outcome['path']}, but another archive is committed")
        elif not outcome["bucketsnap"]:
            problems.append(
                f"the save of itr {itr} failed with a bare {outcome['type']}, not a BucketsnapError: "
                f"{outcome['message']}\n{outcome['traceback']}"
            )
    return problems


def assert_guarantee(store: SnapshotStore, outcomes: list[dict[str, Any]]) -> None:
    problems = violations(store, outcomes)
    summary = ", ".join(f"itr {o['itr']}: {o['event']}" + (f" ({o['type']})" if "type" in o else "") for o in outcomes)
    assert not problems, "\n".join([f"the gc guarantee is broken (saves: {summary or 'none'}):", *problems])


def assert_run_recovers(store: SnapshotStore, itr: int, seed: int) -> None:
    """The run stays usable: a new save of the same rows commits and verifies, and survives gc(min_age=0)."""
    store.save(itr, make_state(itr, seed, ROWS, CHUNK_ROWS), metrics={"seed": seed})
    store.gc(min_age=0)
    assert_guarantee(store, [])


def unreferenced_chunks(store: SnapshotStore) -> set[str]:
    referenced = {ref for info in store.infos() for ref in info.refs}
    return {f"{CHUNK_DIR}/{n}" for n in store.storage.list(CHUNK_DIR) if not n.startswith(".")} - referenced


def save_command(backend: Backend, url: str, itr: int, seed: int, **fields: Any) -> dict[str, Any]:
    return {
        "url": url,
        "options": backend.options,
        "itr": itr,
        "seed": seed,
        "rows": ROWS,
        "chunk_rows": CHUNK_ROWS,
        **fields,
    }


def paused_save(
    writer: Worker, backend: Backend, url: str, itr: int, seed: int, during: Callable[[], None], *, at: str = "last"
) -> dict[str, Any]:
    """Run a save in ``writer`` that stops itself before its commit, call ``during``, resume it; its outcome."""
    writer.send("save", **save_command(backend, url, itr, seed, pause="stop", at=at))
    event = writer.expect("paused", "saved", "failed", final=False)
    assert event["event"] == "paused", (
        f"the writer never paused (its progress callback was not called before the save ended): {event}"
    )
    try:
        writer.wait_stopped()
        store = SnapshotStore(url, storage_options=backend.options)
        assert len(unreferenced_chunks(store)) >= CHUNKS, "the paused save's chunks are not stored before its commit"
        assert itr not in store.itrs(), "the save committed before its progress callback's last call"
        during()
    finally:
        writer.resume()
    return writer.expect("saved", "failed")


# -- 1. a writer stopped across gc -----------------------------------------------------------------------------


@pytest.mark.parametrize("named_backend", backend_params("local", "s3", "gcs"), indirect=True)
@pytest.mark.parametrize("during", ["gc_min_age_0", "gc_min_age_waited", "other_saves_commit"])
def test_writer_stopped_across_gc(named_backend: Backend, during: str, pool: Pool) -> None:
    """A writer frozen (SIGSTOP: a suspended VM) after storing its chunks and before its commit, across gc runs
    whose min_age it outlasts."""
    backend = named_backend
    (writer,) = pool.get("plain")
    url = backend.url("stopped")
    store = SnapshotStore(url, storage_options=backend.options)
    store.save(0, make_state(0, 100, ROWS, CHUNK_ROWS), metrics={"seed": 100})

    def run_gc() -> None:
        if during == "gc_min_age_0":
            for _ in range(3):
                store.gc(min_age=0)
        elif during == "gc_min_age_waited":  # each pass min_age after the one before
            for _ in range(3):
                time.sleep(0.7)
                store.gc(min_age=0.5)
        else:  # the run goes on: other saves commit (with chunks of their own) between gc runs
            for itr in (20, 21):
                store.save(itr, make_state(itr, itr + 100, ROWS, CHUNK_ROWS), metrics={"seed": itr + 100})
                store.gc(min_age=0)
            store.gc(min_age=0)

    outcome = paused_save(writer, backend, url, 5, 7, run_gc)
    assert_guarantee(store, [outcome])
    assert_run_recovers(store, 30, 7)


@pytest.mark.parametrize("named_backend", backend_params("local"), indirect=True)
def test_writer_stopped_before_its_archive_across_gc(named_backend: Backend, pool: Pool) -> None:
    """As above, stopped on the first progress call: its chunks stored, no temp archive yet on local disk."""
    backend = named_backend
    (writer,) = pool.get("plain")
    url = backend.url("stopped-early")
    store = SnapshotStore(url, storage_options=backend.options)
    store.save(0, make_state(0, 100, ROWS, CHUNK_ROWS), metrics={"seed": 100})

    def run_gc() -> None:
        for _ in range(2):
            store.gc(min_age=0)

    outcome = paused_save(writer, backend, url, 5, 7, run_gc, at="first")
    assert_guarantee(store, [outcome])
    assert_run_recovers(store, 30, 7)


# -- 2. a replacement process reusing the chunks of a killed save ------------------------------------------------


def leave_orphans(writer: Worker, backend: Backend, url: str, itr: int, seed: int) -> None:
    """A save SIGKILLed after storing its chunks and before its commit (a preempted VM) leaves them unreferenced."""
    writer.send("save", **save_command(backend, url, itr, seed, pause="kill"))
    writer.expect("paused", final=False)
    killed = writer.expect("killed")
    assert killed["signal"] == signal.SIGKILL, f"the killed writer ended otherwise: {killed}{writer.stderr()}"
    store = SnapshotStore(url, storage_options=backend.options)
    assert itr not in store.itrs(), "the killed save committed"
    assert len(unreferenced_chunks(store)) >= CHUNKS, "the killed save left no chunks to reuse"


@pytest.mark.parametrize("named_backend", backend_params("local", "s3", "gcs"), indirect=True)
def test_replacement_reusing_orphan_chunks_across_gc(named_backend: Backend, pool: Pool) -> None:
    """The replacement re-saves the killed save's rows (deterministic training), finds their chunks stored and
    may reuse them; they are older than min_age when gc runs, twice, during its save."""
    backend = named_backend
    (writer,) = pool.get("plain")
    url = backend.url("orphans")
    store = SnapshotStore(url, storage_options=backend.options)
    store.save(0, make_state(0, 100, ROWS, CHUNK_ROWS), metrics={"seed": 100})
    leave_orphans(writer, backend, url, 5, 7)
    time.sleep(0.7)  # the orphans are older than min_age

    def run_gc() -> None:
        store.gc(min_age=0.5)
        time.sleep(0.7)
        store.gc(min_age=0.5)

    outcome = paused_save(writer, backend, url, 5, 7, run_gc)
    assert_guarantee(store, [outcome])
    assert_run_recovers(store, 30, 7)


@pytest.mark.parametrize("named_backend", backend_params("local", "s3"), indirect=True)
def test_replacement_reusing_orphan_chunks_with_gc_clock_2h_ahead(named_backend: Backend, pool: Pool) -> None:
    """As above with the default min_age, run twice by a gc host whose clock is 2 h ahead."""
    backend = named_backend
    writer, gc = pool.get("plain", "skewed")
    gc.set_clock("+2h")
    url = backend.url("orphans-skew")
    store = SnapshotStore(url, storage_options=backend.options)
    store.save(0, make_state(0, 100, ROWS, CHUNK_ROWS), metrics={"seed": 100})
    leave_orphans(writer, backend, url, 5, 7)

    def run_gc() -> None:
        for _ in range(2):
            gc.call("gc", "gc", url=url, options=backend.options, min_age=3600)

    outcome = paused_save(writer, backend, url, 5, 7, run_gc)
    assert_guarantee(store, [outcome])
    assert_run_recovers(store, 30, 7)


# -- 3. clocks hours apart --------------------------------------------------------------------------------------


@pytest.mark.parametrize("named_backend", backend_params("local", "s3"), indirect=True)
def test_gc_clock_2h_ahead_during_a_paused_save(named_backend: Backend, pool: Pool) -> None:
    """gc(min_age=3600), twice, on a host 2 h ahead, while a writer with the true clock is paused."""
    backend = named_backend
    writer, gc = pool.get("plain", "skewed")
    gc.set_clock("+2h")
    url = backend.url("gc-ahead")
    store = SnapshotStore(url, storage_options=backend.options)
    store.save(0, make_state(0, 100, ROWS, CHUNK_ROWS), metrics={"seed": 100})

    def run_gc() -> None:
        for _ in range(2):
            gc.call("gc", "gc", url=url, options=backend.options, min_age=3600)

    outcome = paused_save(writer, backend, url, 5, 7, run_gc)
    assert_guarantee(store, [outcome])
    assert_run_recovers(store, 30, 7)


@pytest.mark.parametrize("named_backend", backend_params("local", "s3"), indirect=True)
def test_reader_of_a_snapshot_dropped_by_a_writer_2h_behind(named_backend: Backend, pool: Pool) -> None:
    """A writer 2 h behind commits; retention (KeepLast(1)) drops the snapshot a reader has open; gc with the
    true clock runs, twice, before the reader reads the rest: the reader gets exact data.

    The dropped snapshot is older than min_age, so that only the drop's recency protects it: on local disk its
    objects are dated 3 h back (a snapshot saved hours ago) and gc has the default min_age; on S3, whose server
    sets the dates, min_age is 2 s and the snapshot 2.3 s old.
    """
    backend = named_backend
    reader, writer = pool.get("plain", "skewed")
    writer.set_clock("-2h")
    url = backend.url("reader")
    min_age = 3600.0 if backend.name == "local" else 2.0
    store = SnapshotStore(url, storage_options=backend.options)
    first = writer.call("save", "saved", **save_command(backend, url, 1, 11, keep_last=1))
    if backend.name == "local":
        long_ago = time.time() - 3 * 3600
        for rel in (first["path"], *first["refs"]):
            os.utime(os.path.join(url, rel), (long_ago, long_ago))
    else:
        time.sleep(min_age + 0.3)
    opened = reader.call("open", "opened", url=url, options=backend.options, itr=1)
    assert opened["exact"], "the reader read a wrong policy before anything was dropped"
    second = writer.call("save", "saved", **save_command(backend, url, 2, 12, keep_last=1))
    assert store.itrs() == [2], "retention KeepLast(1) did not drop itr 1"
    for _ in range(2):
        store.gc(min_age=min_age)
    reader.send("read_rest")
    read = reader.expect("read", "failed")
    assert read["event"] == "read", (
        f"the reader of itr 1 failed after gc(min_age={min_age}) ran a moment after the drop: "
        f"{read['type']}: {read['message']}"
    )
    assert all(read["exact"].values()), f"the reader got wrong data: {read['exact']}"
    assert_guarantee(store, [second])
