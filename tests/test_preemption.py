"""Preemption: a final snapshot on SIGTERM, committed before the exit; resume continues from it."""

from __future__ import annotations

import json
import os
import queue
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from bucketsnap import SnapshotStore, on_preemption
from conftest import Backend
from helpers import Worker

WORKERS = Path(__file__).parent / "workers"
sys.path.insert(0, str(WORKERS))

import trainer  # noqa: E402

# -- in-process: the handler's logic, with SIGUSR1 and SystemExit instead of dying --------------------------


def preempt(handler_kwargs: dict[str, Any], body: Any) -> SystemExit:
    """Run ``body(handler)`` under a SIGUSR1 handler that raises SystemExit; return the SystemExit."""
    with pytest.raises(SystemExit) as raised:
        handler = on_preemption(signals=[signal.SIGUSR1], raise_system_exit=True, **handler_kwargs)
        try:
            body(handler)
        finally:
            handler.uninstall()
    return raised.value


def test_signal_saves_the_current_state_and_exits_128_plus_signum() -> None:
    store = SnapshotStore("memory://preempt/basic")
    state = {"w": torch.zeros(3), "itr": 0}

    def body(handler: Any) -> None:
        for itr in range(1, 5):
            state["w"] += 1
            state["itr"] = itr
            if itr == 3:
                os.kill(os.getpid(), signal.SIGUSR1)
        raise AssertionError("the signal should have ended the loop")

    exit_ = preempt({"store": store, "state_fn": lambda: state, "itr_fn": lambda: state["itr"]}, body)
    assert exit_.code == 128 + signal.SIGUSR1
    assert store.itrs() == [3]
    assert torch.equal(store.load(3)["w"], torch.full((3,), 3.0))
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # uninstalled


def test_hold_defers_the_save_and_a_second_signal_changes_nothing() -> None:
    store = SnapshotStore("memory://preempt/hold")
    state = {"a": 0, "b": 0}
    saves: list[int] = []
    original = store.save

    def counting_save(itr: int, st: Any, **kw: Any) -> Any:
        saves.append(itr)
        os.kill(os.getpid(), signal.SIGUSR1)  # a second signal while the final save runs
        time.sleep(0.05)
        return original(itr, st, **kw)

    store.save = counting_save  # type: ignore[method-assign]

    def body(handler: Any) -> None:
        with handler.hold():
            state["a"] = 1
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.01)  # the handler runs here, and must wait for the block's end
            assert handler.requested and handler.result is None
            state["b"] = 1
        raise AssertionError("the held signal should have been handled at the block's end")

    preempt({"store": store, "state_fn": lambda: dict(state), "itr_fn": lambda: 7}, body)
    assert saves == [7]
    assert store.load(7) == {"a": 1, "b": 1}


def test_in_flight_save_of_the_same_itr_is_not_written_twice() -> None:
    store = SnapshotStore("memory://preempt/inflight")

    def body(handler: Any) -> None:
        store.save_async(5, {"w": torch.ones(1000)})
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(1)

    preempt({"store": store, "state_fn": lambda: {"w": torch.zeros(1)}, "itr_fn": lambda: 5}, body)
    assert store.itrs() == [5]
    assert torch.equal(store.load(5)["w"], torch.ones(1000))  # the in-flight save's, committed once


def test_deadline_exits_without_committing_a_slow_final_save() -> None:
    store = SnapshotStore("memory://preempt/deadline")
    store.save(1, {"w": 1})
    release = threading.Event()
    original = store._write

    def slow_write(*args: Any, **kwargs: Any) -> Any:
        release.wait(10)
        return original(*args, **kwargs)

    store._write = slow_write  # type: ignore[method-assign]
    started = time.monotonic()

    def body(handler: Any) -> None:
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(5)

    preempt({"store": store, "state_fn": lambda: {"w": 2}, "itr_fn": lambda: 2, "deadline": 0.5}, body)
    assert time.monotonic() - started < 5
    assert store.itrs() == [1]
    release.set()


def test_failing_state_fn_still_exits() -> None:
    store = SnapshotStore("memory://preempt/failing")

    def broken() -> dict[str, Any]:
        raise RuntimeError("no model yet")

    exit_ = preempt(
        {"store": store, "state_fn": broken, "itr_fn": lambda: 1},
        lambda handler: (os.kill(os.getpid(), signal.SIGUSR1), time.sleep(1)),
    )
    assert exit_.code == 128 + signal.SIGUSR1
    assert store.itrs() == []


def test_bad_arguments() -> None:
    store = SnapshotStore("memory://preempt/args")
    with pytest.raises(ValueError, match="deadline"):
        on_preemption(store, dict, itr_fn=lambda: 0, deadline=0)
    with pytest.raises(ValueError, match="signals"):
        on_preemption(store, dict, itr_fn=lambda: 0, signals=[])
    errors: list[BaseException] = []

    def off_main() -> None:
        try:
            on_preemption(store, dict, itr_fn=lambda: 0)
        except RuntimeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=off_main)
    thread.start()
    thread.join()
    assert errors and "main thread" in str(errors[0])


# -- a real training process ---------------------------------------------------------------------------------


class Trainer:
    """tests/workers/trainer.py in a process of its own (helpers.Worker), its stdout lines read by a thread."""

    def __init__(self, backend: Backend, url: str, until: int) -> None:
        self.out = Path(tempfile.mkdtemp(prefix="trainer-")) / "stdout"
        self.err = self.out.with_name("stderr")
        self.proc = Worker(
            str(WORKERS / "trainer.py"), [url, json.dumps(backend.options), str(until), "10"], self.out, self.err
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        """Each whole line of its stdout as it comes (the file is polled), until it has ended."""
        with open(self.out) as out:
            pending = ""
            while True:
                ended = self.proc.poll() is not None
                pending += out.read()
                *lines, pending = pending.split("\n")
                for line in lines:
                    self.lines.put(line.strip())
                if ended:
                    return
                time.sleep(0.005)

    def wait_for(self, prefix: str, *, above: int = -1, timeout: float = 60) -> int:
        """Wait for a line ``<prefix> <n>`` with n > above; return n."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                self.proc.kill()
                raise AssertionError(
                    f"no '{prefix}' line above {above} in {timeout} s; seen {self.seen[-5:]}"
                ) from None
            self.seen.append(line)
            word, _, value = line.partition(" ")
            if word == prefix and (value == "none" or int(value) > above):
                return -1 if value == "none" else int(value)

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        code = self.proc.wait(timeout)
        err = self.err.read_text()
        shutil.rmtree(self.out.parent, ignore_errors=True)
        return code, err


def check_snapshot(store: SnapshotStore, itr: int) -> None:
    """``itr`` is committed, verifies, and its model loads into the trainer's model."""
    store.verify(itr)
    state = store.load(itr)
    assert state["itr"] == itr
    model, optimizer = trainer.make()
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optim"])


# On local disk on demand (`-m slow`): the S3 variant holds the same handler and resume, and on local disk
# tests/test_testing_preempt.py's test_sigterm_during_a_save_lets_on_preemption_finish_it holds SIGTERM's final save.
@pytest.mark.parametrize(
    "process_backend",
    [
        pytest.param("local", marks=pytest.mark.slow),
        pytest.param("s3", marks=pytest.mark.s3),
        pytest.param("gcs", marks=pytest.mark.gcs),
        pytest.param("azure", marks=pytest.mark.azure),
    ],
    indirect=True,
)
def test_sigterm_commits_a_newer_snapshot_and_resume_continues_from_it(process_backend: Backend) -> None:
    rng = random.Random(5)
    url = process_backend.url("preempt")
    store = SnapshotStore(url, storage_options=process_backend.options)
    resumed_from = -1
    for during_upload in (True, False):
        run = Trainer(process_backend, url, until=100_000)
        assert run.wait_for("resumed") == resumed_from
        run.wait_for("committed", above=resumed_from)
        before = store.info("last").itr
        run.wait_for("step", above=before)  # the loop is past the last committed itr
        if during_upload:
            run.wait_for("saving", above=before)  # signal while save_async uploads
            time.sleep(rng.uniform(0, 0.05))
        else:
            time.sleep(rng.uniform(0, 0.4))
        run.proc.send_signal(signal.SIGTERM)
        code, err = run.finish()
        assert code == -signal.SIGTERM, err
        last = store.info("last").itr
        assert last > before, err
        check_snapshot(store, last)
        # Bit for bit what an uninterrupted run has after `last` itrs: the final snapshot is consistent, and
        # the second run continued from the first one's final snapshot, optimizer state included.
        reference = trainer.train(last)
        final = store.load(last, keys=["model"])["model"]
        assert all(torch.equal(final[k], reference[k]) for k in reference)
        resumed_from = last


def test_sigkill_during_an_upload_leaves_the_previous_snapshot_intact(process_backend: Backend) -> None:
    url = process_backend.url("killed")
    store = SnapshotStore(url, storage_options=process_backend.options)
    run = Trainer(process_backend, url, until=100_000)
    run.wait_for("committed")
    before = store.info("last").itr
    run.wait_for("saving", above=before)
    run.proc.send_signal(signal.SIGKILL)
    code, _ = run.finish()
    assert code == -signal.SIGKILL
    assert before in store.itrs()
    for itr in store.itrs():
        check_snapshot(store, itr)
