"""Background saves for :meth:`SnapshotStore.save_async`: a bounded pool whose errors are never lost.

At most ``max_in_flight`` jobs run; :meth:`BackgroundSaves.submit` first waits for a free slot, which bounds
the memory held by in-flight host copies. A job's ``on_end`` callback runs once whatever happens to the job
(done, failed, cancelled, never submitted), so the host buffers it read always go back to their pool. A job's
error is delivered once: by its future, if the caller asks the future (``result()`` or ``exception()``),
otherwise by the store's next ``save``/``save_async``/``flush``/``close``, or, with no such call, logged on the
``bucketsnap`` logger when the store is dropped or Python exits. Trade-off: an error the caller never asks about
is raised at a later, unrelated call, which is surprising but better than a silent loss of a snapshot.

As Python exits (before it stops thread pools from starting work, which the saves' uploads need), it waits for
every save in flight, those submitted meanwhile too. A program that returned right after a ``save_async`` lost
that save before: on S3, GCS and Azure its uploads could not start. A save submitted once the pools are
stopped (from a thread still running after the main thread returned) is refused, saying so.
"""

from __future__ import annotations

import atexit
import concurrent.futures.thread  # noqa: F401 - its exit hook, which stops every pool, must be registered first
import logging
import os
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, wait
from typing import Any, Generic, TypeVar

from bucketsnap._pools import Pool

__all__ = ["BackgroundSaves", "SaveFuture"]

T = TypeVar("T")

logger = logging.getLogger("bucketsnap")


class SaveFuture(Future[T], Generic[T]):
    """A future whose error, once the caller has seen it, is not raised again by the store."""

    def __init__(self, owner: BackgroundSaves[T]) -> None:
        super().__init__()
        self._owner = owner

    def result(self, timeout: float | None = None) -> T:
        try:
            return super().result(timeout)
        except BaseException:
            if self.done():
                self._owner._seen(self)
            raise

    def exception(self, timeout: float | None = None) -> BaseException | None:
        error = super().exception(timeout)
        self._owner._seen(self)
        return error


class BackgroundSaves(Generic[T]):
    """Runs jobs on ``max_in_flight`` threads, keeping each failure until it has been raised once."""

    def __init__(self, max_in_flight: int, *, name: str = "bucketsnap-save", where: str = "") -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, not {max_in_flight}")
        self.max_in_flight = max_in_flight
        self._name = name
        self.where = where
        self._executor: Pool | None = None
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._lock = threading.Lock()
        self._in_flight: set[SaveFuture[T]] = set()
        self._failed: list[SaveFuture[T]] = []

    def submit(self, job: Callable[[], T], *, on_end: Callable[[], None] | None = None) -> SaveFuture[T]:
        """Run ``job`` in the background once a slot is free (waits for one).

        ``on_end`` is called exactly once: after ``job`` returns or raises and before the future is resolved, so
        a caller woken by the future finds it done; or, if ``job`` never runs (the future was cancelled, or
        this call raised), when that is known.
        """
        future: SaveFuture[T] = SaveFuture(self)
        scheduled = False
        try:
            self._slots.acquire()
            try:
                if self._executor is None:
                    self._executor = Pool(self.max_in_flight, thread_name_prefix=self._name)
                    _wait_at_exit_for(self)
                with self._lock:
                    self._in_flight.add(future)
                self._executor.submit(self._run, job, future, on_end)
                scheduled = True
            except BaseException:
                with self._lock:
                    self._in_flight.discard(future)
                self._slots.release()
                raise
        finally:
            if not scheduled and on_end is not None:
                on_end()
        return future

    def pending(self) -> list[SaveFuture[T]]:
        """The futures not yet done."""
        with self._lock:
            return list(self._in_flight)

    def cancel_queued(self) -> int:
        """Cancel the jobs that have not started; return how many were cancelled (running ones go on)."""
        return sum(future.cancel() for future in self.pending())

    def flush(self, timeout: float | None = None, *, where: str = "") -> None:
        """Wait for every job; raise the first failure not yet raised.

        Raises:
            TimeoutError: jobs were still running after ``timeout`` seconds (they go on in the background).
        """
        _, not_done = wait(self.pending(), timeout=timeout)
        if not_done:
            raise TimeoutError(f"{len(not_done)} save(s) to {where} still running after {timeout} s")
        self.raise_failure()

    def close(self, *, where: str = "") -> None:
        """Wait for every job and stop the threads; raise the first failure not yet raised."""
        try:
            self.flush(where=where)
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def raise_failure(self) -> None:
        """Raise the oldest failure nobody has seen yet, if any."""
        with self._lock:
            future = self._failed.pop(0) if self._failed else None
        if future is not None:
            error = Future.exception(future)
            assert error is not None
            raise error

    def _run(self, job: Callable[[], T], future: SaveFuture[T], on_end: Callable[[], None] | None) -> None:
        if not future.set_running_or_notify_cancel():
            try:
                if on_end is not None:
                    on_end()
            finally:
                self._finish(future)
            return
        try:
            try:
                result = job()
            finally:
                if on_end is not None:
                    on_end()
        except BaseException as exc:
            with self._lock:
                self._failed.append(future)
            future.set_exception(exc)
        else:
            future.set_result(result)
        self._finish(future)

    def _finish(self, future: SaveFuture[T]) -> None:
        with self._lock:
            self._in_flight.discard(future)
        self._slots.release()

    def log_unseen(self) -> None:
        """Log, on the ``bucketsnap`` logger, every failure nobody has seen (nobody is left to raise them to)."""
        while True:
            with self._lock:
                future = self._failed.pop(0) if self._failed else None
            if future is None:
                return
            error = Future.exception(future)
            logger.error(
                "a save_async to %s failed, and nobody asked its future: %s: %s",
                self.where,
                type(error).__name__,
                error,
            )

    def __del__(self) -> None:
        if getattr(self, "_failed", None):  # a store dropped with a failure nobody saw: said, not lost
            self.log_unseen()

    def _seen(self, future: SaveFuture[Any]) -> None:
        with self._lock:
            if future in self._failed:
                self._failed.remove(future)


#: Every BackgroundSaves that started its threads and is still referenced: waited for as Python exits.
_started: weakref.WeakSet[BackgroundSaves[Any]] = weakref.WeakSet()
_registered = False
_register_lock = threading.Lock()


def _wait_at_exit_for(saves: BackgroundSaves[Any]) -> None:
    """Have Python's exit wait for ``saves``' jobs (see the module docstring); registers the hook on first use."""
    global _registered
    with _register_lock:
        _started.add(saves)
        if _registered:
            return
        _registered = True
        # threading's exit hooks run last registered first, before the joins of non-daemon threads and atexit's
        # hooks; concurrent.futures' own (imported above), which stops every pool, was registered before this.
        register = getattr(threading, "_register_atexit", None)
        try:
            if register is not None:
                register(_wait_at_exit)
            else:  # not CPython's threading: the latest hook there is
                atexit.register(_wait_at_exit)
        except RuntimeError:  # Python is exiting already: its pools start nothing, and the job fails saying so
            pass


def _wait_at_exit() -> None:
    """Wait for every save in flight, also those submitted meanwhile, then log the failures nobody was told of."""
    while pending := [future for saves in list(_started) for future in saves.pending()]:
        wait(pending)
    for saves in list(_started):
        saves.log_unseen()


if hasattr(os, "register_at_fork"):  # a forked child has none of the parent's threads: its saves never end there
    os.register_at_fork(after_in_child=_started.clear)
