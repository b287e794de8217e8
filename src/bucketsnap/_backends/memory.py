"""fsspec's memory filesystem: one process, one dict; a lock makes the check-then-write of an exclusive create
atomic, and a written object is buffered and stored in one assignment."""

from __future__ import annotations

import io
import threading
from typing import ClassVar

from bucketsnap._backends.base import Backend

__all__ = ["MemoryBackend"]

_LOCK = threading.Lock()


class MemoryBackend(Backend):
    """``memory://``: what a process's tests and CI runs use."""

    name: ClassVar[str] = "memory"
    atomic_create: ClassVar[bool] = True
    remote: ClassVar[bool] = False

    def create_exclusive(self, path: str, data: bytes, *, where: str) -> None:
        with _LOCK:
            if self.fs.exists(path):
                raise FileExistsError(where)
            self.fs.pipe_file(path, data)

    def open_writer(self, path: str, *, where: str) -> _MemoryWriter:
        return _MemoryWriter(self, path)


class _MemoryWriter:
    def __init__(self, backend: MemoryBackend, path: str) -> None:
        self._backend = backend
        self._path = path
        self.file = io.BytesIO()

    def commit(self) -> None:
        self._backend.fs.pipe_file(self._path, self.file.getvalue())

    def abort(self) -> None:
        self.file = io.BytesIO()
