"""tf_agents-style triggers: :class:`IntervalTrigger` and :class:`PolicySaveTrigger`.

:class:`IntervalTrigger` has tf_agents' semantics: it fires when ``value - last >= interval``, or when forced
unless ``value`` is the value it last fired at; an interval <= 0 never fires, not even when forced.

:class:`PolicySaveTrigger` replaces tf_agents' ``PolicySavedModelTrigger``: instead of a SavedModel per policy
plus a checkpoint, each policy variant (``greedy``, ``collect``, ``raw``...) is one member of a bucketsnap
snapshot at the train step, so an inference host reads the one it serves and nothing else. With
``async_saving=True`` it builds on :meth:`SnapshotStore.save_async`: a call copies the weights to host memory
and returns; the upload runs in a background thread. At most one of its saves is in flight: a call that fires
while the previous save is still uploading *waits* for it (nothing is coalesced or skipped, so every fired step
is saved, as in tf_agents). Metadata metrics are evaluated in the calling thread, at the call, so they are
consistent with the weights even when saving is asynchronous (tf_agents supports them only synchronously).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any

from bucketsnap._info import SnapshotInfo, check_metrics
from bucketsnap._store import SnapshotStore, as_store

__all__ = ["IntervalTrigger", "PolicySaveTrigger"]

logger = logging.getLogger("bucketsnap")


class IntervalTrigger:
    """Call ``fn(value)`` each time ``value`` has advanced by at least ``interval`` since it last fired.

    Args:
        interval: the minimum advance between two firings; <= 0 disables the trigger.
        fn: called with the value it fires at.
        start: the value the trigger counts from (it first fires at ``start + interval``).

    A call whose ``fn`` raises does not count as fired, so the next call tries again (tf_agents records the
    value before calling ``fn``, and would wait a whole interval).

    Example:
        >>> fired = []
        >>> trigger = IntervalTrigger(10, fired.append)
        >>> for step in (5, 10, 15, 21, 21):
        ...     trigger(step)
        >>> trigger(21, force_trigger=True)  # already fired at 21: forcing does nothing
        >>> trigger(22, force_trigger=True)
        >>> fired
        [10, 21, 22]
    """

    def __init__(self, interval: int, fn: Callable[[int], Any], start: int = 0) -> None:
        self._interval = interval
        self._fn = fn
        self._original_start = start
        self._last = start

    @property
    def interval(self) -> int:
        """The minimum advance between two firings."""
        return self._interval

    @property
    def last_value(self) -> int:
        """The value it last fired at (``start`` before the first firing)."""
        return self._last

    def __call__(self, value: int, force_trigger: bool = False) -> None:
        """Fire ``fn(value)`` if ``value - last >= interval``, or if forced and ``value`` differs from the last.

        Args:
            value: the current value, such as the train step.
            force_trigger: fire even before the interval has passed (at the end of training, say), unless the
                trigger already fired at this very value.
        """
        if self._interval <= 0:
            return
        if (force_trigger and value != self._last) or value >= self._last + self._interval:
            self._fn(value)
            self._last = value

    def reset(self) -> None:
        """Count from the ``start`` given at construction again."""
        self._last = self._original_start

    def set_start(self, start: int) -> None:
        """Count from ``start``: the next firing is at ``start + interval`` (``reset`` still returns to the
        constructor's start)."""
        self._last = start


class PolicySaveTrigger(IntervalTrigger):
    """Every ``interval`` train steps, save each policy variant as a member of one snapshot.

    Args:
        url_or_store: the run's URL, or a :class:`SnapshotStore` (to set retention or compression).
        policies: name -> policy, such as ``{"greedy": ..., "collect": ..., "raw": ...}``; each is a module or
            anything with ``state_dict()``, or a state dict itself. Each is saved as member ``name``, so
            ``store.load(keys=["greedy"])`` downloads only that one.
        train_step: the step counter: an int, a tensor or anything with ``.item()`` or ``int()``, or a
            callable returning one. A call without a value reads it; the value a save fires at is its itr.
        interval: save every ``interval`` steps; <= 0 never saves.
        async_saving: return after copying the weights to host memory and upload in a background thread.
        metadata_metrics: name -> metric saved as the snapshot's metrics: an object with ``.result()`` (as
            tf_agents' metrics), a callable, or a plain value; evaluated when the trigger fires.
        start: the step to count from.
        storage_options: passed to fsspec when ``url_or_store`` is a URL.

    Saving a step that is already committed (a resumed run that fires at the step it was preempted after)
    replaces that snapshot, as tf_agents overwrites its checkpoint. With ``async_saving`` a background failure
    is raised by the next call (fired or not), by :meth:`flush` and by :meth:`close`; it is never lost.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(2, 1)
        >>> step = 0
        >>> trigger = PolicySaveTrigger("memory://doc/policies", {"greedy": net, "raw": net}, lambda: step, 100)
        >>> for step in range(0, 301, 50):
        ...     trigger(step)
        >>> trigger.store.itrs()
        [100, 200, 300]
    """

    def __init__(
        self,
        url_or_store: str | SnapshotStore,
        policies: Mapping[str, Any],
        train_step: Any,
        interval: int,
        *,
        async_saving: bool = False,
        metadata_metrics: Mapping[str, Any] | None = None,
        start: int = 0,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(policies, Mapping) or not policies:
            raise ValueError("policies must be a non-empty dict of name -> policy, such as {'greedy': policy}")
        for name, policy in policies.items():
            if not isinstance(policy, Mapping) and not callable(getattr(policy, "state_dict", None)):
                raise TypeError(
                    f"policy {name!r} is a {type(policy).__name__}: pass a module, anything with state_dict(), "
                    "or a state dict"
                )
        super().__init__(interval, self._save, start)
        self._owns_store = not isinstance(url_or_store, SnapshotStore)
        self._store = as_store(url_or_store, storage_options=storage_options)
        self._policies = dict(policies)
        self._train_step = train_step
        self._async = async_saving
        self._metrics = dict(metadata_metrics or {})
        self._future: Future[SnapshotInfo] | None = None
        self._settled = threading.Event()

    @property
    def store(self) -> SnapshotStore:
        """The store snapshots are saved to."""
        return self._store

    @property
    def async_saving(self) -> bool:
        """Whether saves upload in a background thread."""
        return self._async

    def __call__(self, value: int | None = None, force_trigger: bool = False) -> None:
        """Save if ``value`` (default: the current train step) is due; first raise a background save's error."""
        self._raise_background_error()
        super().__call__(self.train_step() if value is None else _as_int(value), force_trigger)

    def train_step(self) -> int:
        """The current value of ``train_step``."""
        return _as_int(self._train_step() if callable(self._train_step) else self._train_step)

    def flush(self) -> None:
        """Wait for the save in flight, if any; raise its error."""
        if self._future is not None:
            self._settled.wait()
        self._raise_background_error()

    def close(self) -> None:
        """Wait for the save in flight and raise its error; close the store if this trigger opened it."""
        try:
            self.flush()
        finally:
            if self._owns_store:
                self._store.close()

    def __enter__(self) -> PolicySaveTrigger:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc is None:
            self.close()
            return
        try:  # already unwinding: wait for the upload, but do not mask the error being raised
            self.close()
        except Exception as background:
            logger.error("background policy save failed while %s was being raised: %s", exc_type, background)

    def _save(self, itr: int) -> None:
        # Read the weights and the metrics here, in the caller's thread, so that they describe the same step.
        state = {name: _state_dict(policy) for name, policy in self._policies.items()}
        metrics = check_metrics({name: _metric_value(m) for name, m in self._metrics.items()})
        if not self._async:
            self._store.save(itr, state, metrics=metrics, overwrite=True)
            return
        self.flush()  # at most one save in flight: wait for the previous upload
        self._settled.clear()
        future = self._store.save_async(itr, state, metrics=metrics, overwrite=True)
        self._future = future
        # Added after the store's own callback, so it runs after the store has queued any error.
        future.add_done_callback(lambda _: self._settled.set())

    def _raise_background_error(self) -> None:
        future = self._future
        if future is None or not self._settled.is_set():
            return
        self._future = None
        future.result()  # raises the background error; seen here, the store does not raise it again


def _as_int(step: Any) -> int:
    """A step counter's value: ints, numpy ints, tensors, anything with ``.item()`` or ``int()``."""
    return int(step.item() if hasattr(step, "item") else step)


def _state_dict(policy: Any) -> Any:
    if isinstance(policy, Mapping):
        return policy
    return policy.state_dict()


def _metric_value(metric: Any) -> Any:
    if callable(getattr(metric, "result", None)):
        return metric.result()
    if callable(metric):
        return metric()
    return metric
