"""Reusable host buffers for :meth:`SnapshotStore.save_async`'s copies of the state.

A freshly allocated buffer is page-faulted in as it is first written, and for a large state that costs several
times the copy itself (a 404 MB state: ``clone()`` of every tensor 0.12-0.20 s, ``copy_`` into buffers already
touched 0.03 s). So each store keeps the buffers of its recent copies and hands them to the next save that
needs the same byte sizes: from the second ``save_async`` of a training loop on, the copy goes to memory that
is already mapped.

A save takes its buffers through a :class:`HostLease`, which gives them all back once the background write
that reads them has ended (committed, failed or cancelled); until then no other save can be handed them.
Buffers are matched by exact size, and after each copy the free buffers that the copy did not take are
dropped, so the pool follows the state's current shapes and never holds more than the in-flight copies
already needed: at most ``max_in_flight + 1`` times the state's size.

Trade-off: that memory stays allocated between saves, where a copy used to be freed as soon as its write
ended; :meth:`SnapshotStore.close` releases it, and ``SnapshotStore(keep_host_copies=False)`` never keeps it
(every save then pays for fresh memory).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["HostCopies", "HostLease"]


class HostCopies:
    """A thread-safe pool of flat ``uint8`` CPU buffers, handed out by exact byte size.

    Args:
        keep: keep buffers given back for the next save; False frees them as soon as their save ends.
    """

    def __init__(self, *, keep: bool = True) -> None:
        self.keep = keep
        self._lock = threading.Lock()
        self._free: dict[int, list[torch.Tensor]] = {}
        self._busy_bytes = 0
        #: buffers allocated, and buffers handed out again, since the pool was made (for tests and tuning)
        self.allocated = 0
        self.reused = 0

    def lease(self) -> HostLease:
        """A new lease: the buffers of one save, given back together."""
        return HostLease(self)

    @property
    def free_bytes(self) -> int:
        """Bytes held for reuse by no save."""
        with self._lock:
            return sum(size * len(buffers) for size, buffers in self._free.items())

    @property
    def busy_bytes(self) -> int:
        """Bytes held by leases not yet given back."""
        with self._lock:
            return self._busy_bytes

    def drop_free(self) -> None:
        """Forget every buffer no lease holds (called after each copy, and by ``close``)."""
        with self._lock:
            self._free.clear()

    def _take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            buffers = self._free.get(nbytes)
            buffer = buffers.pop() if buffers else None
            if buffers is not None and not buffers:
                del self._free[nbytes]
            self._busy_bytes += nbytes
            if buffer is not None:
                self.reused += 1
                return buffer
            self.allocated += 1
        import torch  # here, not at the top: importing bucketsnap (the CLI) needs no torch

        try:
            # outside the lock, so that background returns need not wait; a normal tensor even under
            # inference_mode, since torch refuses in-place writes to an inference tensor outside it
            with torch.inference_mode(False):
                return torch.empty(nbytes, dtype=torch.uint8, device="cpu")  # whatever the default device
        except BaseException:
            with self._lock:
                self._busy_bytes -= nbytes
            raise

    def _give_back(self, buffers: list[torch.Tensor]) -> None:
        with self._lock:
            for buffer in buffers:
                if self.keep:
                    self._free.setdefault(buffer.numel(), []).append(buffer)
                self._busy_bytes -= buffer.numel()


class HostLease:
    """The buffers one save took from a :class:`HostCopies`; :meth:`release` gives them all back."""

    def __init__(self, pool: HostCopies) -> None:
        self._pool = pool
        self._lock = threading.Lock()
        self._buffers: list[torch.Tensor] = []
        self._released = False

    def take(self, nbytes: int) -> torch.Tensor:
        """A flat ``uint8`` CPU tensor of ``nbytes`` bytes, reused if the pool has one; contents undefined."""
        import torch

        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8, device="cpu")
        buffer = self._pool._take(nbytes)
        with self._lock:
            if not self._released:
                self._buffers.append(buffer)
                return buffer
        self._pool._give_back([buffer])
        raise RuntimeError("this host lease was already released")

    def release(self) -> None:
        """Give every buffer back to the pool; call it only once nothing reads them any more (idempotent)."""
        with self._lock:
            buffers, self._buffers = self._buffers, []
            self._released = True
        self._pool._give_back(buffers)
