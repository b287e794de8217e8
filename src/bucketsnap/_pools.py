"""The thread pools that saves and restores run their work on.

:class:`Pool` is a ``ThreadPoolExecutor`` whose ``submit`` (and so ``map``) raises :class:`BucketsnapError`,
saying what happened, where the standard one raises ``RuntimeError("cannot schedule new futures after
interpreter shutdown")``. A save or restore still running on a daemon thread as Python exits is cut off there:
Python starts no thread once it has begun to exit. The bare ``RuntimeError`` said nothing of the kind, and a
restore that met it while decoding a value reported the snapshot as corrupt.
"""

from __future__ import annotations

import concurrent.futures.thread
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from bucketsnap.errors import BucketsnapError

__all__ = ["Pool"]

T = TypeVar("T")


class Pool(ThreadPoolExecutor):
    """A ``ThreadPoolExecutor`` that says so when work is submitted to it as Python exits."""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        try:
            return super().submit(fn, *args, **kwargs)
        except RuntimeError as exc:
            if not (getattr(concurrent.futures.thread, "_shutdown", False) or sys.is_finalizing()):
                raise
            raise BucketsnapError(
                "Python is exiting, and bucketsnap's reads and writes cannot start new threads: a save or restore "
                "still running (on a daemon thread, in an atexit hook, or started after the main thread returned) "
                "is cut off; finish it before the program exits"
            ) from exc
