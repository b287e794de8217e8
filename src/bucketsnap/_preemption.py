"""Preemption: on SIGTERM, write a final snapshot within a deadline, commit it, then exit as the signal says.

Spot and preemptible VMs send SIGTERM and then a grace period (GCP 30 s, AWS 2 minutes) before the hard kill.
:func:`on_preemption` installs a handler for that moment::

    store = bucketsnap.SnapshotStore("s3://bucket/run")
    itr, state = bucketsnap._resume(store, {"model": model.state_dict(), "optim": optim.state_dict()})
    with bucketsnap.on_preemption(store, lambda: {"model": model.state_dict(), "optim": optim.state_dict()},
                                  itr_fn=lambda: itr):
        for itr in range(itr + 1, n_iters):
            train_one_step()

When a signal arrives, the handler, in the main thread:

1. waits for the :meth:`~bucketsnap.SnapshotStore.save_async` calls in flight, for at most half the
   deadline (they are older snapshots, usually nearly uploaded); queued ones that have not started are
   cancelled, and one still running goes on beside the final save (it commits, or it is lost with the VM,
   invisible either way);
2. calls ``state_fn()`` and ``itr_fn()`` and saves that state as snapshot ``itr`` (unless ``itr`` is already
   committed), in a helper thread it waits for until the deadline;
3. exits: the signal's default action is restored and the signal sent again, so the process ends "killed by
   SIGTERM" (status 143 in a shell, ``-15`` for ``subprocess``), as it would have without the handler. With
   ``raise_system_exit=True`` it raises ``SystemExit(128 + signum)`` instead, so ``finally`` blocks and
   ``atexit`` handlers run (and may outlast the grace period).

Consistency. The handler runs between two Python bytecodes of the main thread. If the main thread is inside
bucketsnap or ``torch.optim`` (a save being prepared, an optimizer step half applied), the handler waits for
it to leave, by re-sending itself the signal every 50 ms, for at most a fifth of the deadline. Code that must
not be cut in two can say so explicitly: a signal arriving inside ``with handler.hold():`` is handled when the
block exits. Across ranks, :func:`~bucketsnap.distributed.agree_on_preemption` decides the step: once it is in
use, a signal is acted on only after an agreement that said "preempted", so every rank's final save starts at
the same step (a signal that arrives after a step's agreement waits for the next step's).

Trade-offs. A second signal during the window is logged and ignored: the final save goes on and nothing is
written twice; only SIGKILL (which no handler sees) stops it, leaving the previous snapshots intact. If the
deadline passes first, the process exits anyway: the unfinished snapshot stays invisible, and ``resume`` gets
the last committed one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import FrameType
from typing import Any

from bucketsnap._info import SnapshotInfo
from bucketsnap._store import SnapshotStore
from bucketsnap.errors import SnapshotExistsError, SnapshotNotFoundError

__all__ = ["DEFAULT_DEADLINE", "PreemptionHandler", "on_preemption"]

logger = logging.getLogger("bucketsnap")

#: Seconds from the signal to the exit, by default: GCP's 30 s grace period less a margin.
DEFAULT_DEADLINE = 25.0
#: Share of the deadline spent waiting for the main thread to leave bucketsnap or torch.optim code.
_DEFER_SHARE = 0.2
#: Share of the deadline spent waiting for save_async calls in flight.
_FLUSH_SHARE = 0.5
_RETRY_SIGNAL_AFTER = 0.05
_UNSAFE_MODULES = ("bucketsnap.", "torch.optim")


class PreemptionHandler:
    """Signal handling that writes a final snapshot; create it with :func:`on_preemption`.

    Attributes:
        signum: the signal that started the final save, or None while none arrived.
        result: the final snapshot's info once committed (None before, or if it failed or timed out).
    """

    def __init__(
        self,
        store: SnapshotStore,
        state_fn: Callable[[], Mapping[str, Any]],
        *,
        itr_fn: Callable[[], int],
        deadline: float = DEFAULT_DEADLINE,
        signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT),
        raise_system_exit: bool = False,
    ) -> None:
        if deadline <= 0:
            raise ValueError(f"deadline must be positive, not {deadline}")
        self.store = store
        self.state_fn = state_fn
        self.itr_fn = itr_fn
        self.deadline = deadline
        self.signals = tuple(signals)
        if not self.signals:
            raise ValueError("signals is empty: pass at least signal.SIGTERM")
        self.raise_system_exit = raise_system_exit
        self.signum: int | None = None
        self.result: SnapshotInfo | None = None
        self._previous: dict[int, Any] = {}
        self._started = 0.0
        self._handling = False
        self._held = 0
        self._deferred = False
        #: The last agreement of :func:`~bucketsnap.distributed.agree_on_preemption` (None: none yet, or alone).
        self._agreed: bool | None = None

    def __repr__(self) -> str:
        return f"PreemptionHandler({self.store.url!r}, signals={[signal.Signals(s).name for s in self.signals]})"

    # -- installing ----------------------------------------------------------------------------------------

    def install(self) -> PreemptionHandler:
        """Install the handler for :attr:`signals` (from the main thread, as Python requires)."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("on_preemption must be called from the main thread: only it can handle signals")
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def uninstall(self) -> None:
        """Put back the handlers that were there before :meth:`install`."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> PreemptionHandler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    @property
    def requested(self) -> bool:
        """Whether a signal arrived (the final save is done, under way, or deferred)."""
        return self.signum is not None

    def agreed(self, anywhere: bool) -> None:
        """Record the outcome of a collective agreement (:func:`~bucketsnap.distributed.agree_on_preemption`
        calls it on every rank, once per step).

        Once ranks agree, a signal is acted on only after an agreement that said so: one that arrives after
        this step's agreement was read (during its all-reduce, or between two :meth:`hold` blocks) waits for the
        next step's, so that no rank starts its final, collective save while the others go on training.
        """
        self._agreed = anywhere
        if anywhere and self._deferred and not self._held and not self._handling and self.signum is not None:
            self._on_signal(self.signum, None)  # agreed outside a hold() block: nothing else would run it

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """A block the final save must not cut in two: a signal arriving inside is handled at its end."""
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1
            if self._held == 0 and self._deferred and not self._handling and self.signum is not None:
                self._on_signal(self.signum, None)

    # -- handling ------------------------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._handling:
            logger.warning("%s ignored: the final snapshot is being written", signal.Signals(signum).name)
            return
        if self.signum is None:
            self.signum = signum
            self._started = time.monotonic()
            logger.warning("%s received: writing a final snapshot to %s", signal.Signals(signum).name, self.store.url)
        if self._agreed is False:  # the ranks agreed on no preemption this step: wait for the next agreement
            self._deferred = True
            return
        if self._held or (self._elapsed() < self.deadline * _DEFER_SHARE and _in_unsafe_code(frame)):
            self._deferred = True
            if not self._held:  # come back soon: the main thread will have left that code
                timer = threading.Timer(_RETRY_SIGNAL_AFTER, os.kill, (os.getpid(), self.signum))
                timer.daemon = True
                timer.start()
            return
        self._deferred = False
        self._handling = True
        try:
            self._final_save()
        finally:
            self._exit(self.signum)

    def _final_save(self) -> None:
        self._settle_in_flight()
        try:
            itr = int(self.itr_fn())
            state = self.state_fn()
        except Exception:
            logger.exception("preemption: itr_fn or state_fn failed; no final snapshot")
            return
        if self._committed(itr):
            logger.warning("preemption: itr %d is already committed at %s", itr, self.store.url)
            return
        outcome: dict[str, Any] = {}

        def save() -> None:
            try:
                outcome["info"] = self.store.save(itr, state)
            except BaseException as exc:
                outcome["error"] = exc

        worker = threading.Thread(target=save, name="bucketsnap-preemption", daemon=True)
        worker.start()
        worker.join(max(0.0, self.deadline - self._elapsed()))
        if worker.is_alive():
            logger.error(
                "preemption: the final snapshot (itr %d) was not committed within the %.0f s deadline; the last "
                "committed snapshot stays the one to resume from",
                itr,
                self.deadline,
            )
        elif isinstance(outcome.get("error"), SnapshotExistsError):
            logger.warning("preemption: itr %d was committed meanwhile by a save in flight", itr)
        elif "error" in outcome:
            logger.error("preemption: the final snapshot (itr %d) failed: %s", itr, outcome["error"])
        else:
            self.result = outcome["info"]
            logger.warning("preemption: committed itr %d to %s in %.1f s", itr, self.store.url, self._elapsed())

    def _settle_in_flight(self) -> None:
        """Wait (bounded) for save_async calls in flight; cancel queued ones; log their errors, raise none."""
        for _ in range(1000):  # flush raises one background error per call
            try:
                self.store.flush(timeout=max(0.0, self.deadline * _FLUSH_SHARE - self._elapsed()))
                return
            except TimeoutError:
                cancelled = self.store.cancel_queued()
                logger.warning(
                    "preemption: a save in flight is still running; it goes on beside the final one "
                    "(%d queued save(s) cancelled)",
                    cancelled,
                )
                return
            except Exception as exc:
                logger.error("preemption: an earlier background save failed: %s", exc)

    def _committed(self, itr: int) -> bool:
        try:
            self.store.info(itr)
        except SnapshotNotFoundError:
            return False
        except Exception as exc:
            logger.warning("preemption: could not read the manifest of %s: %s", self.store.url, exc)
            return False
        return True

    def _exit(self, signum: int) -> None:
        self.uninstall()
        if self.raise_system_exit:
            raise SystemExit(128 + signum)
        logging.shutdown()  # flush log handlers: the default action ends the process at once
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        time.sleep(1.0)  # the signal is delivered at once; this is only for a signal that is blocked
        os._exit(128 + signum)

    def _elapsed(self) -> float:
        return time.monotonic() - self._started


def _in_unsafe_code(frame: FrameType | None) -> bool:
    """Whether the interrupted main thread is inside bucketsnap (but not this module) or ``torch.optim``."""
    while frame is not None:
        module = str(frame.f_globals.get("__name__", ""))
        if module != __name__ and module.startswith(_UNSAFE_MODULES):
            return True
        frame = frame.f_back
    return False


def on_preemption(
    store: SnapshotStore,
    state_fn: Callable[[], Mapping[str, Any]],
    *,
    itr_fn: Callable[[], int],
    deadline: float = DEFAULT_DEADLINE,
    signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT),
    raise_system_exit: bool = False,
) -> PreemptionHandler:
    """Install a handler that, on one of ``signals``, saves ``state_fn()`` as ``itr_fn()`` and exits.

    Use the returned handler as a context manager to uninstall it at the end of training, or call
    :meth:`~PreemptionHandler.uninstall`.

    Args:
        store: where to save.
        state_fn: returns the state to save, as for :meth:`~bucketsnap.SnapshotStore.save`.
        itr_fn: returns the itr of that state (the last completed iteration).
        deadline: seconds from the signal to the exit, the final commit included.
        signals: the signals to handle; ``(signal.SIGTERM,)`` leaves Ctrl-C alone.
        raise_system_exit: exit by raising ``SystemExit(128 + signum)`` (``finally`` blocks run) rather than
            by the signal's default action.

    Example:
        >>> import signal, bucketsnap
        >>> store = bucketsnap.SnapshotStore("memory://doc/preempt")
        >>> step = 0
        >>> with on_preemption(store, lambda: {"step": step}, itr_fn=lambda: step, signals=[signal.SIGUSR1]):
        ...     step = 1  # training
    """
    return PreemptionHandler(
        store,
        state_fn,
        itr_fn=itr_fn,
        deadline=deadline,
        signals=signals,
        raise_system_exit=raise_system_exit,
    ).install()
