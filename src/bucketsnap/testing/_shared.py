"""Carrying a ``memory://`` run between the test process and the training processes the helper starts.

A memory filesystem lives in one process, so a training process killed and started again would find nothing
to resume from. For such a run the helper seeds each training process with the run's objects as the test
process holds them, the training process journals every object bucketsnap writes or deletes under the run
(after the write or delete succeeded, before the call returns), and the test process replays that journal
when the training process has ended, however it ended. The run then behaves like a bucket that outlives the
process, and the test process can open it afterwards.

All of it goes through :class:`~bucketsnap._storage.Storage`, like everything above the storage layer: only
objects bucketsnap itself writes are carried, and they get new modification times in the test process. A
record cut short by a kill is dropped (its write had not returned in the training process).
"""

from __future__ import annotations

import os
import struct
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

from bucketsnap._storage import Storage

__all__ = ["Journal", "dump", "is_process_local", "objects", "read_journal", "replay"]

#: fsspec protocols whose objects live in the memory of one process.
_ONE_PROCESS = frozenset({"memory"})
_PUT, _DELETE = b"P", b"D"
_HEADER = struct.Struct(">cIQ")  # op, length of the path, length of the data


def is_process_local(url: str) -> bool:
    """Whether a run at ``url`` is lost with the process that wrote it."""
    return urllib.parse.urlsplit(url).scheme in _ONE_PROCESS


def objects(storage: Storage, rel_dir: str = "") -> Iterator[str]:
    """The paths, relative to the root, of every object under ``rel_dir``."""
    files = storage.list_sizes(rel_dir)
    for name in storage.list(rel_dir):
        rel = f"{rel_dir}/{name}" if rel_dir else name
        if name in files:
            yield rel
        else:
            yield from objects(storage, rel)


class Journal:
    """An append-only file of puts and deletes, written with one ``os.write`` loop per record."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def put(self, rel: str, data: bytes) -> None:
        self._append(_PUT, rel, data)

    def delete(self, rel: str) -> None:
        self._append(_DELETE, rel, b"")

    def close(self) -> None:
        os.close(self._fd)

    def _append(self, op: bytes, rel: str, data: bytes) -> None:
        name = rel.encode()
        view = memoryview(_HEADER.pack(op, len(name), len(data)) + name + data)
        while view:
            view = view[os.write(self._fd, view) :]


def read_journal(path: str | os.PathLike[str]) -> Iterator[tuple[bytes, str, bytes]]:
    """``(op, rel, data)`` for each whole record of the journal at ``path`` (none if it does not exist)."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return
    at = 0
    while at + _HEADER.size <= len(raw):
        op, name_size, data_size = _HEADER.unpack_from(raw, at)
        start = at + _HEADER.size
        end = start + name_size + data_size
        if end > len(raw):
            return  # cut short by a kill
        yield op, raw[start : start + name_size].decode(), raw[start + name_size : end]
        at = end


def dump(storage: Storage, path: str | os.PathLike[str]) -> None:
    """Write every object under ``storage``'s root to a journal at ``path``, as puts."""
    journal = Journal(path)
    try:
        for rel in objects(storage):
            journal.put(rel, storage.read(rel))
    finally:
        journal.close()


def replay(storage: Storage, path: str | os.PathLike[str]) -> int:
    """Apply the journal at ``path`` to ``storage``; returns the number of records applied."""
    count = 0
    for op, rel, data in read_journal(path):
        if op == _PUT:
            with storage.write(rel) as f:
                f.write(data)
        else:
            storage.delete(rel)
        count += 1
    return count
