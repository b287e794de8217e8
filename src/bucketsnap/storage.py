"""The storage layer: an fsspec URL turned into the five verbs the commit protocol needs.

``write`` (a streamed object that becomes visible whole or not at all), ``create_exclusive`` (fails if the name
exists), ``read`` (whole or a byte range), ``list`` and ``delete``. Everything above this module speaks paths
relative to the run's root and never sees a filesystem object.

How each backend gets its guarantees:

* **Local disk.** Objects are written to a temp file in the destination directory, fsynced, then
  ``os.replace``-d into place; exclusive creates ``os.link`` a fsynced temp file to the final name, which fails
  if the name exists. fsspec's local transactions are not used: they stage in ``$TMPDIR`` and move across
  devices. A directory the run needs is fsynced into its parent once per :class:`Storage` (and the run root into
  its own parent where the root is created), so that a power loss after the first commit cannot lose the
  directories that hold it. A temp file removed before it is moved into place (by gc, or by hand, while the save
  was paused) fails the save with a :class:`~bucketsnap.errors.StorageError` that says so.
* **S3 and GCS.** An upload (single PUT, S3 multipart upload, or GCS compose of part objects; see
  :mod:`bucketsnap.uploads`) becomes visible only when it completes, so a crash leaves nothing, an invisible
  incomplete upload, or GCS part objects that gc removes. Exclusive creates use fsspec's
  ``pipe_file(mode="create")`` which s3fs sends as ``If-None-Match: *`` and gcsfs as ``ifGenerationMatch=0``.
  Some S3-compatible servers ignore the condition and accept every create, which would lose commits silently, so
  the first write or exclusive create of a process under a run root is preceded by a probe: a throwaway object
  beside it is created twice, and unless the server refuses the second create nothing is uploaded or committed (a
  :class:`~bucketsnap.errors.StorageError` says what the server lacks). Probing before the first upload rather
  than at the commit means a refused save has uploaded nothing. The probe costs three requests once per process,
  endpoint and run root, and its verdict is kept. ``single_writer=True`` skips it and commits check-then-write
  (the condition still sent), for runs that only one process ever writes.
  Other object stores (and GCS with ``upload_concurrency=1``) stream through the fsspec writer; a failed write
  is aborted with ``discard()`` rather than closed, because closing would complete the upload with partial
  data.
* **Memory.** One process; a lock makes the check-then-write of an exclusive create atomic, and objects are
  buffered and stored in one assignment.
* **Anything else.** fsspec's generic ``mode="create"`` is check-then-write. bucketsnap warns once and uses it:
  two writers racing on such a backend can lose a commit.

Backend errors other than "not found" and "exists" are raised as :class:`~bucketsnap.errors.StorageError`
naming the URL with credentials redacted.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import posixpath
import threading
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from bucketsnap.errors import BucketsnapError, StorageError, redact
from bucketsnap.transport import Retry, ThreadedWriter, is_throttled, is_transient
from bucketsnap.uploads import GcsComposeWriter, PartUploader, S3MultipartWriter

__all__ = ["PROBE_PREFIX", "Storage"]

logger = logging.getLogger("bucketsnap")

T = TypeVar("T")

_MEMORY_LOCK = threading.Lock()
_warned_protocols: set[str] = set()

#: Each object store with a conditional create: its name and the condition that makes a create exclusive.
_CONDITIONAL_CREATE = {
    "s3": ("S3", "If-None-Match: *"),
    "s3a": ("S3", "If-None-Match: *"),
    "gs": ("GCS", "ifGenerationMatch=0"),
    "gcs": ("GCS", "ifGenerationMatch=0"),
}
_ATOMIC_CREATE_PROTOCOLS = set(_CONDITIONAL_CREATE)
#: Names of exclusive-create probe objects start with this (readers ignore them; gc leaves young ones alone).
PROBE_PREFIX = ".probe-exclusive-create.tmp-"
#: The exclusive-create probe's verdict per (protocol, endpoint, root), for this process; guarded by _PROBE_LOCK.
_probed: dict[tuple[str, str, str], bool] = {}
_probe_locks: dict[tuple[str, str, str], threading.Lock] = {}
_PROBE_LOCK = threading.Lock()
#: Roots already warned about committing check-then-write under ``single_writer=True``.
_warned_single_writer: set[tuple[str, str, str]] = set()

#: Part size for streamed uploads to object stores: a part is uploaded each time this much is buffered, so it
#: bounds the memory a save needs beyond the state itself.
DEFAULT_PART_SIZE = 16 * 2**20
#: Parts uploaded at once by one S3 or GCS save: with the part being filled, a save holds at most
#: ``(DEFAULT_UPLOAD_CONCURRENCY + 1) * part_size`` bytes of upload buffers.
DEFAULT_UPLOAD_CONCURRENCY = 4


class Storage:
    """A run's root on some fsspec filesystem.

    Args:
        url: any fsspec URL or a local path.
        storage_options: passed to the fsspec filesystem (credentials, ``endpoint_url``...).
        part_size: bytes buffered per uploaded part on object stores.
        upload_concurrency: parts uploaded at once to S3 or GCS (see :mod:`bucketsnap.uploads`).
        retry: the retry policy for transient backend errors on object stores.
        single_writer: only one process ever writes this run: commit check-then-write without first probing
            whether the object store refuses a second create of one name (see the module docstring).
    """

    def __init__(
        self,
        url: str,
        *,
        storage_options: dict[str, Any] | None = None,
        part_size: int = DEFAULT_PART_SIZE,
        upload_concurrency: int = DEFAULT_UPLOAD_CONCURRENCY,
        retry: Retry | None = None,
        single_writer: bool = False,
    ) -> None:
        if upload_concurrency < 1:
            raise ValueError(f"upload_concurrency must be at least 1, not {upload_concurrency}")
        if not isinstance(url, (str, os.PathLike)):
            raise TypeError(f"url must be a string or path, not {type(url).__name__}")
        url = os.fspath(url)
        if not url:
            raise ValueError("url is empty: pass a local path or an fsspec URL such as s3://bucket/run")
        self.url = redact(url.rstrip("/") or url)
        try:
            fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        except (ImportError, ValueError) as exc:
            raise BucketsnapError(
                f"cannot open {self.url}: {exc}. For s3:// install bucketsnap[s3], for gs:// bucketsnap[gcs]."
            ) from exc
        self.fs: fsspec.AbstractFileSystem = fs
        self.root: str = root.rstrip("/") if root not in ("/", "") else root
        self.part_size = part_size
        self.upload_concurrency = upload_concurrency
        self.retry = retry or Retry()
        self.is_local = isinstance(fs, LocalFileSystem)
        self.is_memory = isinstance(fs, MemoryFileSystem)
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        self.protocol: str = protocol
        self.atomic_create = self.is_local or self.is_memory or protocol in _ATOMIC_CREATE_PROTOCOLS
        self.single_writer = single_writer
        #: Whether the exclusive create is probed before the first write or commit (an object store's, unverified).
        self._probes = protocol in _CONDITIONAL_CREATE and not single_writer
        self._endpoint = _endpoint_of(fs)
        #: Local directories made durable in their parent by this storage (see :meth:`_local_dir`).
        self._durable_dirs: set[str] = set()
        #: Bytes and requests read through :meth:`read` since creation (what a restore really downloaded).
        self.bytes_read = 0
        self.read_requests = 0
        self._stats_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    # -- naming --------------------------------------------------------------------------------------------

    def path(self, rel: str) -> str:
        """The backend path of ``rel`` (relative to the root)."""
        return f"{self.root}/{rel}" if rel else self.root

    def url_of(self, rel: str) -> str:
        """The redacted URL of ``rel``, for messages and :class:`~bucketsnap.SnapshotInfo`."""
        return f"{self.url}/{rel}" if rel else self.url

    # -- the verbs -----------------------------------------------------------------------------------------

    def read(self, rel: str, start: int | None = None, end: int | None = None) -> bytes:
        """Read ``rel`` whole, or the byte range ``[start, end)``. Raises FileNotFoundError if missing."""
        data = bytes(self._call(rel, lambda: self.fs.cat_file(self.path(rel), start=start, end=end)))
        with self._stats_lock:
            self.bytes_read += len(data)
            self.read_requests += 1
        return data

    def size(self, rel: str) -> int:
        """The size in bytes of ``rel`` (a fresh request, not a cached listing)."""
        return int(self._call(rel, lambda: self._fresh(rel, self.fs.size)))

    def modified(self, rel: str) -> float | None:
        """The modification time of ``rel`` as a POSIX timestamp, or None where the backend has none."""
        info = self._call(rel, lambda: self._fresh(rel, self.fs.info))
        for field in ("mtime", "LastModified", "updated", "created"):
            value = info.get(field)
            if value is None:
                continue
            if isinstance(value, (int, float)):
                return float(value)
            if hasattr(value, "timestamp"):
                return float(value.timestamp())
            with contextlib.suppress(ValueError):
                from datetime import datetime

                return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
        return None

    def list(self, rel_dir: str) -> list[str]:
        """Names (not paths) of the objects directly under ``rel_dir``; empty if it does not exist."""
        path = self.path(rel_dir)

        def ls() -> list[str]:
            self.fs.invalidate_cache(path)
            try:
                entries = self.fs.ls(path, detail=False)
            except FileNotFoundError:
                return []
            return sorted(str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries)

        return self._call(rel_dir, ls)

    def list_sizes(self, rel_dir: str) -> dict[str, int]:
        """Name -> size in bytes of the objects directly under ``rel_dir`` (one listing); empty if it does not exist."""
        path = self.path(rel_dir)

        def ls() -> dict[str, int]:
            self.fs.invalidate_cache(path)
            try:
                entries = self.fs.ls(path, detail=True)
            except FileNotFoundError:
                return {}
            return {
                str(e["name"]).rstrip("/").rsplit("/", 1)[-1]: int(e["size"])
                for e in entries
                if e.get("type") == "file"
            }

        return self._call(rel_dir, ls)

    def is_file(self, rel: str = "") -> bool:
        """Whether ``rel`` (the root itself by default) is a single object rather than a directory or nothing."""
        path = self.path(rel)

        def check() -> bool:
            self.fs.invalidate_cache(path)
            return bool(self.fs.isfile(path))

        return self._call(rel, check)

    def exists(self, rel: str) -> bool:
        """Whether ``rel`` exists (a fresh check, not a cached listing)."""
        path = self.path(rel)

        def check() -> bool:
            self.fs.invalidate_cache(path)
            return bool(self.fs.exists(path))

        return self._call(rel, check)

    def delete(self, rel: str) -> None:
        """Delete ``rel``; a missing object is not an error."""

        def rm() -> None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.path(rel))

        self._call(rel, rm)

    def create_exclusive(self, rel: str, data: bytes) -> None:
        """Create ``rel`` with ``data``; raise FileExistsError if it already exists."""
        if self.is_local:

            def create() -> None:
                self._local_dir(os.path.dirname(self.path(rel)))
                _local_create_exclusive(self.path(rel), data, where=self.url_of(rel))

            self._call(rel, create, writing=True)
        elif self.is_memory:
            with _MEMORY_LOCK:
                if self.fs.exists(self.path(rel)):
                    raise FileExistsError(self.url_of(rel))
                self.fs.pipe_file(self.path(rel), data)
        elif self.single_writer:
            self._warn_single_writer()
            if self.exists(rel):
                raise FileExistsError(self.url_of(rel))
            # The condition is still sent: a server that honours it refuses a second writer after all.
            self._call(rel, lambda: self._remote_create_exclusive(rel, data), retryable=is_throttled)
        else:
            if self._probes:
                self._check_exclusive_create(rel)
            elif not self.atomic_create and self.protocol not in _warned_protocols:
                _warned_protocols.add(self.protocol)
                warnings.warn(
                    f"{self.protocol}:// has no known atomic exclusive create; bucketsnap falls back to "
                    "check-then-write, so two writers committing at the same instant can lose a commit",
                    RuntimeWarning,
                    stacklevel=3,
                )
            # Retried only when throttled: after a lost response to an applied create, a retry would read
            # our own commit as another writer's.
            self._call(rel, lambda: self._remote_create_exclusive(rel, data), retryable=is_throttled)

    @contextlib.contextmanager
    def write(self, rel: str) -> Iterator[IO[bytes]]:
        """Stream a new object to ``rel``: visible whole when the block exits cleanly, never if it raises."""
        if self._probes:  # before the first upload: a save refused at its commit would have uploaded in vain
            self._check_exclusive_create(rel)
        if self.is_local:

            def open_local() -> _LocalAtomicWriter:
                self._local_dir(os.path.dirname(self.path(rel)))
                return _LocalAtomicWriter(self.path(rel), where=self.url_of(rel))

            writer = self._call(rel, open_local, writing=True)
            try:
                yield writer.file
            except BaseException:
                writer.abort()
                raise
            self._call(rel, writer.commit)
        elif self.is_memory:
            buffer = io.BytesIO()
            yield buffer
            self.fs.pipe_file(self.path(rel), buffer.getvalue())
        elif (uploader := self._part_uploader(rel)) is not None:
            try:
                yield uploader  # type: ignore[misc]
            except BaseException:
                uploader.abort()
                raise
            self._call(rel, uploader.close, retryable=_never)  # close retries its own requests
        else:
            f = self._call(rel, lambda: self.fs.open(self.path(rel), "wb", block_size=self.part_size))
            threaded = ThreadedWriter(f, part_size=self.part_size)  # compress the next part while this one uploads
            try:
                yield threaded  # type: ignore[misc]
                self._call(rel, threaded.close, retryable=_never)
            except BaseException:
                threaded.abort()
                with contextlib.suppress(Exception):
                    f.discard()  # aborts the multipart or resumable upload instead of completing it
                # Mark it closed: s3fs's discard leaves it open and gcsfs's does nothing before the first
                # part, so a later close() (even the garbage collector's) would publish the partial object.
                f.closed = True
                raise
            self._call(rel, f.close, retryable=_never)  # a close cannot be retried: it may have completed

    # -- helpers -------------------------------------------------------------------------------------------

    def _part_uploader(self, rel: str) -> PartUploader[Any] | None:
        """A concurrent part uploader for ``rel`` where the backend has one (S3; GCS unless concurrency is 1)."""
        kind: Callable[..., PartUploader[Any]]
        if self.protocol in ("s3", "s3a") and hasattr(self.fs, "call_s3"):
            kind = S3MultipartWriter
        elif self.protocol in ("gs", "gcs") and hasattr(self.fs, "merge") and self.upload_concurrency > 1:
            kind = GcsComposeWriter
        else:
            return None
        return kind(
            self.fs,
            self.path(rel),
            part_size=self.part_size,
            concurrency=self.upload_concurrency,
            retry=self.retry,
            where=self.url_of(rel),
        )

    def _check_exclusive_create(self, rel: str) -> None:
        """Make sure the object store refuses a second create of one name before a commit relies on it.

        Once per process and (endpoint, root), before the first write or exclusive create: a throwaway object
        beside ``rel`` is created twice and deleted. Its name is no generation's or snapshot's (readers ignore it)
        and holds ``.tmp-``, so gc removes one that a crash left behind. Raises StorageError, now and on every
        later call, where the second create was accepted.
        """
        key = (self.protocol, self._endpoint, self.root)
        with _PROBE_LOCK:
            lock = _probe_locks.setdefault(key, threading.Lock())
        with lock:  # concurrent first commits of one process wait for one probe
            honoured = _probed.get(key)
            if honoured is None:
                honoured = _probed[key] = self._probe(posixpath.dirname(rel))
        if not honoured:
            service, condition = _CONDITIONAL_CREATE[self.protocol]
            server = f"the {service} server at {self._endpoint}" if self._endpoint else f"the {service} service"
            raise StorageError(
                f"{self.url}: {server} does not honour conditional writes ({condition}): it "
                "accepted a second create of one object name, so two writers committing at the same instant would "
                "lose a commit without an error. Nothing was committed. Use a server that refuses such a create "
                "(AWS S3, GCS, LocalStack and moto do), or, if only one process ever writes this run, open it "
                "with SnapshotStore(url, single_writer=True), which commits check-then-write."
            )

    def _probe(self, rel_dir: str) -> bool:
        """Whether a second create of one name under ``rel_dir`` is refused (three requests)."""
        probe = posixpath.join(rel_dir, f"{PROBE_PREFIX}{uuid.uuid4().hex}")
        try:
            try:
                self._call(probe, lambda: self._remote_create_exclusive(probe, b"probe"), retryable=is_throttled)
            except FileExistsError:
                return True  # a retry after a lost response was refused: the condition holds
            try:
                self._call(probe, lambda: self._remote_create_exclusive(probe, b"probe"), retryable=is_throttled)
            except FileExistsError:
                return True
            logger.debug("%s accepted a second create of %s", self._endpoint or self.protocol, self.url_of(probe))
            return False
        finally:
            try:
                self.delete(probe)
            except BucketsnapError as exc:  # left to gc (its name holds .tmp-)
                logger.debug("could not delete the probe object %s: %s", self.url_of(probe), exc)

    def _warn_single_writer(self) -> None:
        key = (self.protocol, self._endpoint, self.root)
        if key in _warned_single_writer:
            return
        _warned_single_writer.add(key)
        logger.warning(
            "%s: committing check-then-write (single_writer=True): the store's exclusive create is not verified, "
            "so a second process writing this run at the same instant could lose a commit",
            self.url,
        )

    def _local_dir(self, directory: str) -> None:
        """Create ``directory`` (and what is missing above it) and make it durable in its parent.

        Each directory between the root and ``directory`` is fsynced into its parent once per storage, whoever
        created it (a process that crashed after its makedirs may not have); directories above the root only
        where this call creates them, since the run owns nothing above its root.
        """
        if directory in self._durable_dirs:
            os.makedirs(directory, exist_ok=True)  # removed since (by hand): recreate, as before
            return
        above: list[str] = []  # the root and its ancestors that this call creates
        current = self.root
        while current and not os.path.exists(current) and os.path.dirname(current) != current:
            above.append(current)
            current = os.path.dirname(current)
        os.makedirs(directory, exist_ok=True)
        chain: list[str] = []  # the directories from ``directory`` up to a child of the root
        current, inside = directory, self.root.rstrip("/") + "/"
        while current != self.root and current.startswith(inside):
            chain.append(current)
            current = os.path.dirname(current)
        for new in (*chain, *above):
            if new not in self._durable_dirs:
                _fsync_dir(os.path.dirname(new))
                self._durable_dirs.add(new)
        self._durable_dirs.add(directory)

    def _remote_create_exclusive(self, rel: str, data: bytes) -> None:
        path = self.path(rel)
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            raise
        except Exception as exc:  # s3fs and gcsfs report a failed precondition in their own ways
            if _is_precondition_failure(exc):
                raise FileExistsError(self.url_of(rel)) from exc
            raise
        finally:
            self.fs.invalidate_cache(path)

    def _fresh(self, rel: str, fn: Callable[[str], T]) -> T:
        # s3fs and gcsfs answer info() from a cached listing of the parent directory when they have one, so
        # after list() an object written since by another process reads as missing: drop the cache first.
        path = self.path(rel)
        self.fs.invalidate_cache(path)
        return fn(path)

    def _call(
        self,
        rel: str,
        fn: Callable[[], T],
        *,
        writing: bool = False,
        retryable: Callable[[BaseException], bool] = is_transient,
    ) -> T:
        """Run ``fn``, translating backend errors into bucketsnap's at this boundary.

        "Not found" and "exists" pass through for the protocol to interpret, except when ``writing``: a
        write that finds no parent directory is a storage failure, not a missing snapshot. On object stores,
        failures that ``retryable`` accepts are retried with :attr:`retry`.
        """
        try:
            if self.is_local or self.is_memory:
                return fn()
            return self.retry.call(fn, what=f"storage operation on {self.url_of(rel)}", retryable=retryable)
        except FileNotFoundError as exc:
            if not writing:
                raise
            raise StorageError(
                f"cannot write {self.url_of(rel)}: {_redacted(exc)}. Check that the location exists and is writable."
            ) from exc
        except (FileExistsError, BucketsnapError):
            raise
        except PermissionError as exc:
            raise StorageError(
                f"permission denied on {self.url_of(rel)}: {exc}. Check the credentials and the bucket policy."
            ) from exc
        except Exception as exc:
            raise StorageError(
                f"storage operation on {self.url_of(rel)} failed: {type(exc).__name__}: {_redacted(exc)}"
            ) from exc


def _never(exc: BaseException) -> bool:
    return False


def _redacted(exc: BaseException) -> str:
    return redact(str(exc))[:500]


def _is_precondition_failure(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = f"{type(current).__name__} {current}"
        if "PreconditionFailed" in text or "412" in text or "conditionNotMet" in text:
            return True
        current = current.__cause__ or current.__context__
    return False


def _endpoint_of(fs: fsspec.AbstractFileSystem) -> str:
    """The endpoint ``fs`` talks to, as passed in its options ("" for the service's default)."""
    options = getattr(fs, "storage_options", None) or {}
    client = options.get("client_kwargs") or {}
    endpoint = options.get("endpoint_url") or client.get("endpoint_url") or getattr(fs, "endpoint_url", None)
    return redact(str(endpoint)) if endpoint else ""


def _vanished(where: str, tmp: str) -> StorageError:
    return StorageError(
        f"{where}: the temp file {os.path.basename(tmp)} vanished before it was moved into place (removed by gc or "
        "by hand while the save was paused). Nothing was committed; save again."
    )


def _local_create_exclusive(path: str, data: bytes, *, where: str | None = None) -> None:
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
        _fsync_dir(directory)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _LocalAtomicWriter:
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
        self.file: IO[bytes] = self._writeback  # type: ignore[assignment]

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
        _fsync_dir(self.directory)

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
