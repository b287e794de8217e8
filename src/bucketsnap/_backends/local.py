"""Local disk: temp file, fsync, rename; exclusive creates by hard link; directories made durable.

Objects are written to a temp file in the destination directory, fsynced, then ``os.replace``-d into place;
exclusive creates ``os.link`` a fsynced temp file to the final name, which fails if the name exists. fsspec's
local transactions are not used: they stage in ``$TMPDIR`` and move across devices. A directory the run needs is
fsynced into its parent once per storage (see :meth:`bucketsnap._storage.Storage`), so that a power loss after
the first commit cannot lose the directories that hold it. A temp file removed before it is moved into place (by
gc, or by hand, while the save was paused) fails the save with a :class:`~bucketsnap.errors.StorageError`.
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections.abc import Sequence
from typing import IO, Any, ClassVar

import fsspec

from bucketsnap._backends.base import Backend
from bucketsnap.errors import StorageError

__all__ = ["LocalBackend", "fsync_dir"]


class LocalBackend(Backend):
    """A directory on local disk (fsspec's ``file://``)."""

    name: ClassVar[str] = "local disk"
    atomic_create: ClassVar[bool] = True
    remote: ClassVar[bool] = False

    def __init__(self, fs: fsspec.AbstractFileSystem, **options: Any) -> None:
        super().__init__(fs, **options)
        #: Directories made durable in their parent by this backend (see :meth:`prepare_directory`).
        self._durable: set[str] = set()

    def create_exclusive(self, path: str, data: bytes, *, where: str) -> None:
        create_exclusive(path, data, where=where)

    def open_writer(self, path: str, *, where: str) -> LocalAtomicWriter:
        return LocalAtomicWriter(path, where=where)

    def prepare_directory(self, path: str, *, root: str) -> None:
        """Create directory ``path`` (and what is missing above it) and make it durable in its parent.

        Each directory between ``root`` and ``path`` is fsynced into its parent once per backend, whoever created
        it (a process that crashed after its makedirs may not have); directories above the root only where this
        call creates them, since the run owns nothing above its root.
        """
        durable = self._durable
        if path in durable:
            os.makedirs(path, exist_ok=True)  # removed since (by hand): recreate, as before
            return
        above: list[str] = []  # the root and its ancestors that this call creates
        current = root
        while current and not os.path.exists(current) and os.path.dirname(current) != current:
            above.append(current)
            current = os.path.dirname(current)
        try:
            os.makedirs(path, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:  # not "the object exists": a file is in the way
            raise StorageError(f"cannot create the directory {exc.filename or path}: a file is in the way") from exc
        chain: list[str] = []  # the directories from ``path`` up to a child of the root
        current, inside = path, root.rstrip("/") + "/"
        while current != root and current.startswith(inside):
            chain.append(current)
            current = os.path.dirname(current)
        for new in (*chain, *above):
            if new not in durable:
                fsync_dir(os.path.dirname(new))
                durable.add(new)
        durable.add(path)


def _vanished(where: str, tmp: str) -> StorageError:
    return StorageError(
        f"{where}: the temp file {os.path.basename(tmp)} vanished before it was moved into place (removed by gc or "
        "by hand while the save was paused). Nothing was committed; save again."
    )


def create_exclusive(path: str, data: bytes, *, where: str | None = None) -> None:
    """Create ``path`` holding ``data``, durably; FileExistsError if the name is taken."""
    directory = os.path.dirname(path)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic, and fails with FileExistsError if the name is taken
        except FileNotFoundError as exc:
            if not os.path.exists(tmp):
                raise _vanished(where or path, tmp) from exc
            raise
        fsync_dir(directory)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def fsync_dir(directory: str) -> None:
    """fsync a directory, so the entries made in it survive a power loss."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalAtomicWriter:
    """A temp file beside the destination, fsynced and renamed over it on commit.

    While the file is written, a second thread asks the kernel to write back what is already written
    (``fdatasync`` every :data:`WRITEBACK_EVERY` bytes), so that the fsync on commit has only the tail left: about
    a quarter off a 400 MB save here. Durability does not depend on it: commit always fsyncs the whole file
    after the last write, and the thread is stopped before the file is closed.
    """

    def __init__(self, path: str, *, where: str | None = None) -> None:
        self.path = path
        self.where = where or path  # the URL that messages name
        self.directory = os.path.dirname(path)  # made by the storage (and durable in its parent)
        self.tmp = os.path.join(self.directory, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
        raw = open(self.tmp, "xb")  # noqa: SIM115 -- closed by commit or abort
        self._writeback = _Writeback(raw)
        self.file: Any = self._writeback

    def commit(self) -> None:
        self._writeback.stop()
        raw = self._writeback.raw
        raw.flush()
        os.fsync(raw.fileno())
        raw.close()
        try:
            os.replace(self.tmp, self.path)
        except FileNotFoundError as exc:
            if not os.path.exists(self.tmp):
                raise _vanished(self.where, self.tmp) from exc
            raise
        fsync_dir(self.directory)

    def abort(self) -> None:
        self._writeback.stop()
        self._writeback.raw.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


#: Bytes written between two early writebacks of a local archive.
WRITEBACK_EVERY = 32 * 2**20
_IOV_MAX = 1024  # the smallest IOV_MAX of the platforms with writev (Linux, macOS: 1024)
_datasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync


class _Writeback:
    """A write-only file that has a helper thread ``fdatasync`` it every :data:`WRITEBACK_EVERY` bytes."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self._since = 0
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        n = self.raw.write(data)
        self._wrote(n)
        return n

    def writev(self, pieces: Sequence[Any]) -> int:
        """Write ``pieces`` in order with as few system calls as the platform allows; return the byte count."""
        if not hasattr(os, "writev"):  # Windows
            return sum(self.write(piece) for piece in pieces)
        self.raw.flush()  # what earlier write() calls buffered goes first
        fd, n = self.raw.fileno(), 0
        for start in range(0, len(pieces), _IOV_MAX):
            n += _writev_all(fd, pieces[start : start + _IOV_MAX])
        self._wrote(n)
        return n

    def _wrote(self, n: int) -> None:
        self._since += n
        if self._since >= WRITEBACK_EVERY:
            self._since = 0
            self.raw.flush()  # hand the buffered bytes to the kernel, so the writeback sees them
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="bucketsnap-writeback", daemon=True)
                self._thread.start()
            self._wake.set()

    def flush(self) -> None:
        self.raw.flush()

    def tell(self) -> int:
        return self.raw.tell()

    def stop(self) -> None:
        """Stop the helper thread and wait for it (before the file is fsynced or closed)."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        fd = self.raw.fileno()
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stopping:
                return
            with contextlib.suppress(OSError):  # an optimisation only: commit's fsync reports real errors
                _datasync(fd)


def _writev_all(fd: int, pieces: Sequence[Any]) -> int:
    """``os.writev`` until every byte of ``pieces`` is written (a regular file may take fewer in one call)."""
    views = [memoryview(p).cast("B") for p in pieces]
    total = sum(v.nbytes for v in views)
    written = os.writev(fd, views)
    while written < total:  # rare: resume after the last byte taken
        done, i = written, 0
        while done >= views[i].nbytes:
            done -= views[i].nbytes
            i += 1
        written += os.writev(fd, [views[i][done:], *views[i + 1 :]])
    return total
