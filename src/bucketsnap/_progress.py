"""Progress reporting for long transfers: a plain callback in the library, a tqdm bar in the terminal.

The library never draws anything. ``save``, ``load``, ``verify`` and ``copy_from`` take an optional
``progress`` callback, called as ``progress(done, total)`` with byte counts as the transfer advances (from
the thread doing the work, which for ``save_async`` is a background thread). What the bytes count:

* ``save``: the state's uncompressed bytes encoded so far, out of all of them;
* ``load`` and ``verify``: the stored (compressed) bytes read so far, out of the requested members' total;
* ``copy_from``: the bytes copied so far, out of every object the snapshot needs.

:func:`progress_bar` turns that callback into a tqdm bar with bytes and rate, drawn only when the stream is a
terminal; tqdm is imported only then, so ``import bucketsnap`` never imports it.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any

__all__ = ["ByteCounter", "ProgressCallback", "progress_bar"]

#: ``progress(done, total)``: bytes done so far and the total, both ints.
ProgressCallback = Callable[[int, int], None]


class ByteCounter:
    """Adds up byte counts (from any thread) and reports the running sum and ``total`` to a callback.

    Args:
        total: the number of bytes the transfer will report in all.
        callback: called as ``callback(done, total)`` after each :meth:`add`, and once at creation with 0.

    Example:
        >>> seen = []
        >>> counter = ByteCounter(10, lambda done, total: seen.append((done, total)))
        >>> counter.add(4); counter.add(6)
        >>> seen
        [(0, 10), (4, 10), (10, 10)]
    """

    def __init__(self, total: int, callback: ProgressCallback) -> None:
        self.total = total
        self.done = 0
        self._callback = callback
        self._lock = threading.Lock()
        callback(0, total)

    def add(self, n: int) -> None:
        """Count ``n`` more bytes done."""
        if n <= 0:
            return
        with self._lock:
            self.done += n
            done = self.done
        self._callback(done, self.total)


@contextmanager
def progress_bar(
    description: str,
    *,
    enabled: bool | None = None,
    file: IO[str] | None = None,
) -> Iterator[ProgressCallback | None]:
    """A progress callback drawing a tqdm bar (bytes, rate, time left) on ``file``, or None when disabled.

    Args:
        description: the bar's label.
        enabled: draw the bar; None (the default) draws it only when ``file`` is a terminal.
        file: where to draw (default ``sys.stderr``).

    Yields:
        A callback to pass as ``progress=``, or None when no bar is drawn, so the transfer skips counting.
    """
    stream = sys.stderr if file is None else file
    if enabled is None:
        enabled = _isatty(stream)
    if not enabled:
        yield None
        return
    from tqdm import tqdm  # lazily: only a terminal session needs it

    bar: Any = tqdm(desc=description, total=None, unit="B", unit_scale=True, unit_divisor=1024, file=stream)
    lock = threading.Lock()

    def update(done: int, total: int) -> None:
        with lock:
            if bar.total != total:
                bar.total = total
                bar.refresh()
            bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
