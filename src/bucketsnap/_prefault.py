"""Faulting in a destination buffer's pages in one call before a restore writes into it.

A restore writes gigabytes into tensors whose pages were never touched. Linux then traps once per 4 KiB page
as the bytes are first copied in, which here costs more than the copy itself (0.7-0.85 s of kernel CPU per GB
written into fresh memory). Two calls of ``madvise`` cut that: ``MADV_HUGEPAGE`` asks for transparent huge
pages (2 MiB) for the whole 2 MiB pages inside the buffer, as PyTorch's own ``THP_MEM_ALLOC_ENABLE`` does for
large tensors, and ``MADV_POPULATE_WRITE`` (Linux 5.14) faults the range in one call: 0.2-0.6 s per GB here
(the upper figure when the kernel must first compact memory into huge pages), 0.45 s with small pages. The
pages' contents are unchanged. Where huge pages are off, on an older kernel, off Linux, or where a call fails,
the pages fault in as they are written, as without it.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["prefault"]

#: madvise(2)'s advice: back a range with transparent huge pages where the kernel allows it.
_MADV_HUGEPAGE = 14
#: madvise(2)'s advice: fault in a range's pages, writable.
_MADV_POPULATE_WRITE = 23
#: Smaller buffers are left to fault as they are written: one call would save less than it costs.
_MIN_SIZE = 2**20
_HUGE = 2 * 2**20
_madvise: Any = None


def prefault(view: memoryview, *, background: Callable[[Callable[[], None]], object] | None = None) -> None:
    """Fault in the whole pages of ``view`` (writable, contiguous bytes) where Linux can; never raises.

    With ``background`` (an executor's ``submit``), the faulting-in is handed to it and this returns at once:
    a restore then fills the first pages while the later ones are faulted in, on another core where there is
    one. Writing into the buffer meanwhile is safe: faulting a page in never changes what it holds.
    """
    global _madvise
    if _madvise is False or view.nbytes < _MIN_SIZE or view.readonly or not sys.platform.startswith("linux"):
        return
    if _madvise is None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            _madvise = libc.madvise
        except (OSError, AttributeError):
            _madvise = False
            return
    address = ctypes.addressof(ctypes.c_char.from_buffer(view))
    page = os.sysconf("SC_PAGE_SIZE")
    start = -(-address // page) * page  # whole pages only: the partial ones at the edges fault as written
    end = (address + view.nbytes) // page * page
    huge_start, huge_end = -(-address // _HUGE) * _HUGE, (address + view.nbytes) // _HUGE * _HUGE
    if huge_end > huge_start:  # whole huge pages only, all about to be written: none holds anything else
        _madvise(huge_start, huge_end - huge_start, _MADV_HUGEPAGE)
    if end > start:
        if background is None:
            _populate(start, end)
        else:
            background(lambda: _populate(start, end))


def _populate(start: int, end: int) -> None:
    global _madvise
    madvise = _madvise
    if madvise and madvise(start, end - start, _MADV_POPULATE_WRITE) != 0 and ctypes.get_errno() == 22:
        _madvise = False  # EINVAL: a kernel before 5.14; other errors (ENOMEM: the buffer is gone): this range only
