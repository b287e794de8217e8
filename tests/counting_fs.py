"""A memory filesystem that counts the bytes and requests readers make, registered as ``countmem://``."""

from __future__ import annotations

from typing import Any, ClassVar

import fsspec
from fsspec.implementations.memory import MemoryFileSystem


class CountingMemoryFileSystem(MemoryFileSystem):
    """``memory://`` with a tally of bytes returned by reads; shares MemoryFileSystem's global store."""

    protocol = ("countmem",)
    bytes_read: ClassVar[int] = 0
    reads: ClassVar[int] = 0

    @classmethod
    def reset_counts(cls) -> None:
        cls.bytes_read = 0
        cls.reads = 0

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        data: bytes = super().cat_file(path, start=start, end=end, **kwargs)
        CountingMemoryFileSystem.bytes_read += len(data)
        CountingMemoryFileSystem.reads += 1
        return data

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if "r" in mode:
            raise AssertionError("bucketsnap must read through ranged cat_file, not whole-file opens")
        return super()._open(path, mode, **kwargs)


fsspec.register_implementation("countmem", CountingMemoryFileSystem, clobber=True)
