"""The storage layer: an fsspec URL turned into the verbs the commit protocol needs, on every backend alike.

``write`` (a streamed object that becomes visible whole or not at all), ``create_exclusive`` (fails if the name
exists), ``read`` (whole or a byte range), ``list``, ``delete``, ``size`` and ``modified``. Everything above this
module speaks paths relative to the run's root and never sees a filesystem object.

How each store gets its guarantees is its backend module's business (:mod:`bucketsnap._backends`: local disk,
memory, S3, GCS, Azure, and a generic fsspec fallback, found by protocol). What this layer adds on top, for all
of them:

* **Retries.** On remote stores, failures the backend calls transient are retried with :attr:`Storage.retry`
  (exclusive creates only when throttled: after a lost response to an applied create, a retry would read our
  own commit as another writer's).
* **The exclusive-create probe.** Some S3-compatible servers ignore a create's condition and accept every
  create, which would lose commits silently. Where a backend's atomicity rests on a condition the server must
  honour (:attr:`~bucketsnap._backends.base.Backend.create_condition`), the first write or exclusive create of a
  process under a run root is preceded by a probe: a throwaway object beside it is created twice, and unless the
  server refuses the second create nothing is uploaded or committed (a :class:`~bucketsnap.errors.StorageError`
  says what the server lacks). Probing before the first upload rather than at the commit means a refused save
  has uploaded nothing. The probe costs three requests once per process, endpoint and run root, and its verdict
  is kept. ``single_writer=True`` skips it and commits check-then-write (the condition still sent), for runs that
  only one process ever writes.
* **A warning where there is no atomic create.** fsspec's generic ``mode="create"`` is check-then-write;
  bucketsnap warns once per protocol and uses it: two writers racing on such a backend can lose a commit.
* **One kind of error.** Backend errors other than "not found" and "exists" are raised as
  :class:`~bucketsnap.errors.StorageError` naming the URL with credentials redacted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import threading
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import IO, Any, TypeVar

import fsspec

from bucketsnap._backends import Backend, backend_class
from bucketsnap._transport import Retry
from bucketsnap.errors import BucketsnapError, StorageError, redact

__all__ = ["DEFAULT_PART_SIZE", "DEFAULT_UPLOAD_CONCURRENCY", "PROBE_PREFIX", "Storage"]

logger = logging.getLogger("bucketsnap")

T = TypeVar("T")

_warned_protocols: set[str] = set()
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
#: Parts uploaded at once by one S3, GCS or Azure save: with the part being filled, a save holds at most
#: ``(DEFAULT_UPLOAD_CONCURRENCY + 1) * part_size`` bytes of upload buffers.
DEFAULT_UPLOAD_CONCURRENCY = 4


class Storage:
    """A run's root on some fsspec filesystem.

    Args:
        url: any fsspec URL or a local path.
        storage_options: passed to the fsspec filesystem (credentials, ``endpoint_url``...).
        part_size: bytes buffered per uploaded part on object stores.
        upload_concurrency: parts uploaded at once to object stores with part uploads.
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
                f"cannot open {self.url}: {exc}. For s3:// install bucketsnap[s3], for gs:// bucketsnap[gcs], "
                "for az:// bucketsnap[azure]."
            ) from exc
        self.root: str = root.rstrip("/") if root not in ("/", "") else root
        self.part_size = part_size
        self.upload_concurrency = upload_concurrency
        self.retry = retry or Retry()
        self.single_writer = single_writer
        self.backend: Backend = backend_class(fs)(
            fs, part_size=part_size, upload_concurrency=upload_concurrency, retry=self.retry
        )
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        self.protocol: str = protocol
        #: Whether the exclusive create is probed before the first write or commit (an object store's, unverified).
        self._probes = self.backend.create_condition is not None and not single_writer
        self._endpoint = self.backend.endpoint
        #: Bytes and requests read through :meth:`read` since creation (what a restore really downloaded).
        self.bytes_read = 0
        self.read_requests = 0
        self._stats_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The fsspec filesystem under the backend: for tests that tamper with objects, never for the code above
        this layer (``tests/test_architecture.py`` holds that)."""
        return self.backend.fs

    @property
    def atomic_create(self) -> bool:
        """Whether :meth:`create_exclusive` is atomic on this backend (refused against a racing writer too)."""
        return self.backend.atomic_create

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
        data = self._call(rel, lambda: self.backend.read(self.path(rel), start, end))
        with self._stats_lock:
            self.bytes_read += len(data)
            self.read_requests += 1
        return data

    def size(self, rel: str) -> int:
        """The size in bytes of ``rel`` (a fresh request, not a cached listing)."""
        return self._call(rel, lambda: self.backend.size(self.path(rel)))

    def modified(self, rel: str) -> float | None:
        """The modification time of ``rel`` as a POSIX timestamp, or None where the backend has none."""
        return self._call(rel, lambda: self.backend.modified(self.path(rel)))

    def list(self, rel_dir: str) -> list[str]:
        """Names (not paths) of the objects directly under ``rel_dir``; empty if it does not exist."""
        return sorted(self._call(rel_dir, lambda: self.backend.list(self.path(rel_dir))))

    def list_sizes(self, rel_dir: str) -> dict[str, int]:
        """Name -> size in bytes of the objects directly under ``rel_dir`` (one listing); empty if it does not exist."""
        entries = self._call(rel_dir, lambda: self.backend.list(self.path(rel_dir)))
        return {name: size for name, size in entries.items() if size is not None}

    def is_file(self, rel: str = "") -> bool:
        """Whether ``rel`` (the root itself by default) is a single object rather than a directory or nothing."""
        return self._call(rel, lambda: self.backend.is_file(self.path(rel)))

    def exists(self, rel: str) -> bool:
        """Whether ``rel`` exists (a fresh check, not a cached listing)."""
        return self._call(rel, lambda: self.backend.exists(self.path(rel)))

    def delete(self, rel: str) -> None:
        """Delete ``rel``; a missing object is not an error."""
        self._call(rel, lambda: self.backend.delete(self.path(rel)))

    def create_exclusive(self, rel: str, data: bytes) -> None:
        """Create ``rel`` with ``data``; raise FileExistsError if it already exists."""
        path, where = self.path(rel), self.url_of(rel)

        def create() -> None:
            self.backend.prepare_directory(posixpath.dirname(path), root=self.root)
            self.backend.create_exclusive(path, data, where=where)

        if not self.backend.remote:
            self._call(rel, create, writing=True)
            return
        if self.single_writer:
            self._warn_single_writer()
            if self.exists(rel):
                raise FileExistsError(where)
        elif self._probes:
            self._check_exclusive_create(rel)
        elif not self.backend.atomic_create and self.protocol not in _warned_protocols:
            _warned_protocols.add(self.protocol)
            warnings.warn(
                f"{self.protocol}:// has no known atomic exclusive create; bucketsnap falls back to "
                "check-then-write, so two writers committing at the same instant can lose a commit",
                RuntimeWarning,
                stacklevel=3,
            )
        # Retried only when throttled: after a lost response to an applied create, a retry would read our own
        # commit as another writer's. (Under single_writer the condition is still sent: a server that honours it
        # refuses a second writer after all.)
        self._call(rel, create, retryable=self.backend.is_throttled)

    @contextlib.contextmanager
    def write(self, rel: str) -> Iterator[IO[bytes]]:
        """Stream a new object to ``rel``: visible whole when the block exits cleanly, never if it raises."""
        if self._probes:  # before the first upload: a save refused at its commit would have uploaded in vain
            self._check_exclusive_create(rel)
        path, where = self.path(rel), self.url_of(rel)

        def start() -> Any:
            self.backend.prepare_directory(posixpath.dirname(path), root=self.root)
            return self.backend.open_writer(path, where=where)

        writer = self._call(rel, start, writing=True)
        try:
            yield writer.file
        except BaseException:
            writer.abort()
            raise
        self._call(rel, writer.commit, retryable=_never)  # a commit retries its own requests, or cannot be retried

    # -- helpers -------------------------------------------------------------------------------------------

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
            service = self.backend.name
            server = f"the {service} server at {self._endpoint}" if self._endpoint else f"the {service} service"
            raise StorageError(
                f"{self.url}: {server} does not honour conditional writes ({self.backend.create_condition}): it "
                "accepted a second create of one object name, so two writers committing at the same instant would "
                "lose a commit without an error. Nothing was committed. Use a server that refuses such a create "
                "(AWS S3, GCS, Azure, LocalStack, moto and Azurite do), or, if only one process ever writes this "
                "run, open it with SnapshotStore(url, single_writer=True), which commits check-then-write."
            )

    def _probe(self, rel_dir: str) -> bool:
        """Whether a second create of one name under ``rel_dir`` is refused (three requests)."""
        probe = posixpath.join(rel_dir, f"{PROBE_PREFIX}{uuid.uuid4().hex}")
        path, where = self.path(probe), self.url_of(probe)

        def create() -> None:
            self.backend.create_exclusive(path, b"probe", where=where)

        try:
            try:
                self._call(probe, create, retryable=self.backend.is_throttled)
            except FileExistsError:
                return True  # a retry after a lost response was refused: the condition holds
            try:
                self._call(probe, create, retryable=self.backend.is_throttled)
            except FileExistsError:
                return True
            logger.debug("%s accepted a second create of %s", self._endpoint or self.protocol, where)
            return False
        finally:
            try:
                self.delete(probe)
            except BucketsnapError as exc:  # left to gc (its name holds .tmp-)
                logger.debug("could not delete the probe object %s: %s", where, exc)

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

    def _call(
        self,
        rel: str,
        fn: Callable[[], T],
        *,
        writing: bool = False,
        retryable: Callable[[BaseException], bool] | None = None,
    ) -> T:
        """Run ``fn``, translating backend errors into bucketsnap's at this boundary.

        "Not found" and "exists" pass through for the protocol to interpret, except when ``writing``: a
        write that finds no parent directory is a storage failure, not a missing snapshot. On remote stores,
        failures that ``retryable`` accepts (by default: the backend's transient errors) are retried with
        :attr:`retry`.
        """
        try:
            if not self.backend.remote:
                return fn()
            return self.retry.call(
                fn,
                what=f"storage operation on {self.url_of(rel)}",
                retryable=retryable or self.backend.is_transient,
            )
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
