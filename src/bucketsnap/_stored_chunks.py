"""The replay-buffer chunk objects a process knows to be stored, per storage, so that a save lists ``chunks/``
once per process rather than once per save.

A save reuses a stored chunk only where a committed snapshot of its base generation refers to it
(:mod:`bucketsnap._chunks`); it also needs the object's stored size, and checks that it is still there. A
listing of ``chunks/`` answers both, at one request per 1,000 stored chunks: a run that keeps every snapshot,
with a few new chunks per save, would list ever more on every save. Instead each process remembers the
chunks it listed or wrote, and lists again only when a save needs a chunk it does not know (written by
another process since).

What is remembered is never a reason to reuse a chunk: only a committed snapshot's reference is. An object
remembered here that gc deleted is one that no committed snapshot referred to when gc condemned it, which
no save then reuses (gc's protocol, docs/protocol.md). Trade-off: a chunk deleted by hand, outside bucketsnap,
is noticed by the next process's first save (which writes it again), not by later saves of a process that
already knew it; their snapshots then miss it, and ``verify`` and their restores say so.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping

from bucketsnap._chunk_names import CHUNK_DIR
from bucketsnap._storage import Storage

__all__ = ["lookup", "remember"]

_lock = threading.Lock()
#: Per storage: chunk object name (under ``chunks/``) -> stored size, of those listed or written here.
_known: weakref.WeakKeyDictionary[Storage, dict[str, int]] = weakref.WeakKeyDictionary()


def lookup(storage: Storage, names: Mapping[str, str]) -> dict[str, tuple[str, int]]:
    """``names[name]`` -> (object path, size) for the names of ``names`` (object name -> the caller's key) that
    are stored; lists ``chunks/`` only where one of them is not known to this process."""
    with _lock:
        known = _known.get(storage)
        missing = known is None or any(name not in known for name in names)
    if missing:
        listed = storage.list_sizes(CHUNK_DIR)
        with _lock:  # what the listing shows, and nothing it does not (deleted by gc or by hand)
            _known[storage] = dict(listed)
    with _lock:
        known = _known[storage]
        return {key: (f"{CHUNK_DIR}/{name}", known[name]) for name, key in names.items() if name in known}


def remember(storage: Storage, rel: str, size: int) -> None:
    """Object ``rel`` (``chunks/<name>``) was just stored with ``size`` bytes."""
    with _lock:
        _known.setdefault(storage, {})[rel.rsplit("/", 1)[-1]] = size
