"""The preemption helper: run a training entry point in a subprocess, signal it at an exact moment, restart it.

:func:`preempt` is what a user's test calls to check that a training loop survives a spot VM's SIGTERM or a
hard SIGKILL: the first process gets the signal at the moment chosen (:class:`AfterCommits`,
:class:`DuringSave`), the second runs to its end from whatever was committed, and both are described by an
:class:`Attempt` (what it committed, which snapshot it resumed from, its output). The moment is reached inside
the process (see :mod:`bucketsnap.testing._child`), so it is the same on every run and every machine: no
sleeps, no polling. A ``memory://`` run is carried from one process to the next
(:mod:`bucketsnap.testing._shared`); on disk and on a server the processes share the run as two VMs would.

Trade-off: the helper instruments bucketsnap inside the training process, so it only counts what bucketsnap
does (its commits and saves); a moment in the user's own code ("at step 7") is the script's to arrange.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal as signals
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bucketsnap._storage import Storage
from bucketsnap._store import SnapshotStore
from bucketsnap.testing._run import Run
from bucketsnap.testing._shared import dump, is_process_local, replay

__all__ = ["AfterCommits", "Attempt", "DuringSave", "Moment", "Preempted", "preempt", "run_training"]

DEFAULT_TIMEOUT = 120.0
#: The training process: the hooks of :mod:`bucketsnap.testing._child`, then the entry point.
CHILD_CODE = "import sys; from bucketsnap.testing._child import main; main(sys.argv[1])"
_TAIL_LINES = 40


@dataclass(frozen=True)
class AfterCommits:
    """Signal the process right after the ``n``-th snapshot it commits (the commit has landed)."""

    n: int = 1

    def __post_init__(self) -> None:
        _check_count(self.n)


@dataclass(frozen=True)
class DuringSave:
    """Signal the process in the middle of its ``n``-th save: the archive's bytes are all written but not yet
    published, and nothing of that save is committed."""

    n: int = 1

    def __post_init__(self) -> None:
        _check_count(self.n)


Moment = AfterCommits | DuringSave
_KINDS: dict[type, str] = {AfterCommits: "commit", DuringSave: "save"}


def _check_count(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n counts from 1, not {n!r}")


@dataclass(frozen=True)
class Attempt:
    """One training process, from its start to its exit.

    Attributes:
        returncode: its exit status; ``-signal.SIGKILL`` (or ``-SIGTERM``) if a signal ended it.
        signalled: whether the helper sent it the signal.
        committed: the itrs this process committed, in order (a SIGTERM's final snapshot included).
        resumed_from: the itr of the snapshot it opened as ``"last"`` (through ``resume`` or ``open``/``load``)
            first; None if the run was empty then, or it never opened one.
        stdout: its standard output.
        stderr: its standard error.
        seconds: how long it ran.
    """

    returncode: int
    signalled: bool
    committed: tuple[int, ...]
    resumed_from: int | None
    stdout: str
    stderr: str
    seconds: float


@dataclass(frozen=True)
class Preempted:
    """What :func:`preempt` saw.

    Attributes:
        run: the run both processes trained in.
        killed: the process that got the signal.
        resumed: the process started after it, run to its end.
        committed_at_signal: the run's committed itrs when the signal was sent.
    """

    run: Run
    killed: Attempt
    resumed: Attempt
    committed_at_signal: tuple[int, ...]

    def store(self, **kwargs: Any) -> SnapshotStore:
        """A store of the run, to load what was committed (``kwargs`` go to :class:`~bucketsnap.SnapshotStore`)."""
        return self.run.store(**kwargs)


def preempt(
    entry: str | os.PathLike[str],
    run: Run,
    *,
    args: Sequence[str] = (),
    at: Moment = AfterCommits(1),
    signal: int = signals.SIGTERM,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Preempted:
    """Run ``entry`` until the moment ``at``, send it ``signal``, then run it again to its end.

    Args:
        entry: the training entry point, as ``python`` would run it: a script (``"train.py"``), a module
            (``"mypkg.train"``) or a function called without arguments (``"mypkg.train:main"``).
        run: where it trains (a fixture's :class:`Run`); its ``env`` is set for both processes.
        args: its command-line arguments (``sys.argv[1:]``), the same for both processes.
        at: when to send the signal, counted within the first process.
        signal: ``signal.SIGTERM`` (a spot VM's notice) or ``signal.SIGKILL`` (the hard stop).
        env: more environment variables for both processes.
        cwd: their working directory (default: the test's).
        timeout: seconds each process may run before it is killed and the test fails.

    Raises:
        AssertionError: the first process ended before the moment came, the second did not exit with 0, or
            either ran past ``timeout``. The message has the end of its stderr.
    """
    killed, at_signal = _attempt(entry, run, args, env, cwd, timeout, at, signal)
    if not killed.signalled:
        raise AssertionError(f"{entry} ended before {at} came, so it was never signalled: {_describe(killed)}")
    resumed, _ = _attempt(entry, run, args, env, cwd, timeout, None, 0)
    if resumed.returncode != 0:
        raise AssertionError(f"{entry}, restarted after {signals.Signals(signal).name}, failed: {_describe(resumed)}")
    return Preempted(run, killed, resumed, at_signal)


def run_training(
    entry: str | os.PathLike[str],
    run: Run,
    *,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Attempt:
    """Run ``entry`` once to its end, as :func:`preempt` runs it but without a signal (an uninterrupted
    reference to compare with).

    Raises:
        AssertionError: it did not exit with 0 within ``timeout``.
    """
    attempt, _ = _attempt(entry, run, args, env, cwd, timeout, None, 0)
    if attempt.returncode != 0:
        raise AssertionError(f"{entry} failed: {_describe(attempt)}")
    return attempt


def _attempt(
    entry: str | os.PathLike[str],
    run: Run,
    args: Sequence[str],
    env: Mapping[str, str] | None,
    cwd: str | os.PathLike[str] | None,
    timeout: float,
    moment: Moment | None,
    signum: int,
) -> tuple[Attempt, tuple[int, ...]]:
    work = Path(tempfile.mkdtemp(prefix="bucketsnap-preempt-"))
    try:
        control: dict[str, Any] = {"entry": os.fspath(entry), "args": list(args), "events": str(work / "events")}
        if moment is not None:
            control.update(moment={"kind": _KINDS[type(moment)], "n": moment.n}, signal=int(signum))
        carried = is_process_local(run.url)
        if carried:
            dump(_storage(run), work / "seed")
            control["share"] = {"url": run.url, "seed": str(work / "seed"), "journal": str(work / "journal")}
        (work / "control.json").write_text(json.dumps(control))
        child_env = {**os.environ, **run.env, **(env or {})}
        started = time.monotonic()
        with open(work / "stdout", "wb") as out, open(work / "stderr", "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-c", CHILD_CODE, str(work / "control.json")],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=child_env,
                cwd=cwd,
                start_new_session=True,  # its own group: whatever it started goes with it
            )
        timed_out = False
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signals.SIGKILL)
            proc.wait()
        seconds = time.monotonic() - started
        if carried:
            replay(_storage(run), work / "journal")
        events = _events(work / "events")
        attempt = Attempt(
            returncode=int(proc.returncode),
            signalled=any(e["event"] == "signal" for e in events),
            committed=tuple(e["itr"] for e in events if e["event"] == "committed"),
            resumed_from=next((e["itr"] for e in events if e["event"] == "opened" and e["which"] == "last"), None),
            stdout=(work / "stdout").read_text(errors="replace"),
            stderr=(work / "stderr").read_text(errors="replace"),
            seconds=seconds,
        )
        if timed_out:
            raise AssertionError(f"{entry} was still running after {timeout:.0f} s: {_describe(attempt)}")
        at_signal = next((tuple(e["committed"]) for e in events if e["event"] == "signal"), ())
        return attempt, at_signal
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _storage(run: Run) -> Storage:
    return Storage(run.url, storage_options=dict(run.storage_options) or None)


def _events(path: Path) -> list[dict[str, Any]]:
    events = []
    with contextlib.suppress(FileNotFoundError), open(path) as fh:
        for line in fh:
            with contextlib.suppress(ValueError):  # a line cut short by a kill
                events.append(json.loads(line))
    return events


def _describe(attempt: Attempt) -> str:
    status = str(attempt.returncode)
    if attempt.returncode < 0:
        with contextlib.suppress(ValueError):
            status = f"{attempt.returncode} ({signals.Signals(-attempt.returncode).name})"
    tail = "".join(deque(attempt.stderr.splitlines(keepends=True), maxlen=_TAIL_LINES)) or "(empty)\n"
    return (
        f"exit status {status} after {attempt.seconds:.1f} s, committed {list(attempt.committed)}; "
        f"the last lines of its stderr:\n{tail}"
    )
