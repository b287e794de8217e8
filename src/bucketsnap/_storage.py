"""The storage layer: an fsspec URL turned into the verbs the commit protocol needs, on every backend alike.

``write`` (a streamed object that becomes visible whole or not at all), ``create_exclusive`` (fails if the name
exists), ``read`` (whole or a byte range), ``read_into`` (a byte range into the caller's buffer), ``list``,
``delete``, ``size`` and ``modified``. Everything above this
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
* **A store that cannot be used fails at once.** A process's first request to a store (per endpoint and
  bucket) is a listing of at most one object under the run, given :attr:`Retry.connect_timeout
  <bucketsnap.Retry.connect_timeout>` (10 s) in all, whatever the store client's own retries would take: a
  refused connection, a host name that does not resolve or a server that does not answer raises
  :class:`UnreachableError`; no credentials or refused ones :class:`CredentialsError`; a bucket that does not
  exist :class:`BucketNotFoundError`. Each says in one line which it is and what to do. Once the store has
  answered, its connection errors are transient like any other and retried.
* **One kind of error.** Backend errors other than "not found" and "exists" are raised as
  :class:`~bucketsnap.errors.StorageError` naming the URL with credentials redacted.

The three :class:`~bucketsnap.errors.StorageError` subclasses are defined in :mod:`bucketsnap.errors` (and
re-exported here); the command line turns a missing bucket into its "not found" exit code.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import posixpath
import re
import threading
import time
import urllib.parse
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import IO, Any, TypeVar

import fsspec

from bucketsnap._backends import Backend, Problem, backend_class, backend_for, known_protocols
from bucketsnap._transport import Retry, diagnose
from bucketsnap.errors import (
    BucketNotFoundError,
    BucketsnapError,
    CredentialsError,
    StorageError,
    UnreachableError,
    redact,
    remember_secrets,
)

__all__ = [
    "DEFAULT_PART_SIZE",
    "DEFAULT_UPLOAD_CONCURRENCY",
    "PROBE_PREFIX",
    "BucketNotFoundError",
    "CredentialsError",
    "Storage",
    "UnreachableError",
]

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
#: (protocol, endpoint, bucket) of the stores that have answered this process; guarded by _PROBE_LOCK.
_reached: set[tuple[str, str, str]] = set()
_reach_locks: dict[tuple[str, str, str], threading.Lock] = {}
#: The packages fsspec needs for bucketsnap's object stores, and the extra that installs each.
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure"}


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
        if part_size < 1:
            raise ValueError(f"part_size must be at least 1 byte, not {part_size}")
        if not isinstance(url, (str, os.PathLike)):
            raise TypeError(f"url must be a string or path, not {type(url).__name__}")
        url = os.fspath(url)
        remember_secrets(url)
        if not url:
            raise ValueError("url is empty: pass a local path or an fsspec URL such as s3://bucket/run")
        self.url = redact(url.rstrip("/") or url)
        _refuse_malformed_scheme(url)
        protocol = fsspec.utils.get_protocol(url)
        options = backend_for(protocol).prepare_options(dict(storage_options or {}))
        try:
            fs, root = fsspec.core.url_to_fs(url, **options)
        except ImportError as exc:
            extra = _EXTRAS.get(protocol)
            hint = f"pip install 'bucketsnap[{extra}]'" if extra else "install the package fsspec names"
            raise BucketsnapError(f"cannot open {self.url}: {protocol}:// needs {_redacted(exc)}: {hint}") from exc
        except ValueError as exc:
            raise _open_error(self.url, protocol, exc) from exc
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
        #: Which store :meth:`_reach` asks about: the address requests go to (an Azure connection string's account,
        #: which is no endpoint option), and the bucket.
        self._store_key = (self.protocol, self.backend.address(), self.backend.bucket(self.root))
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
        data = self._call(rel, lambda: self.backend.read(self.path(rel), start, end), reading=True)
        with self._stats_lock:
            self.bytes_read += len(data)
            self.read_requests += 1
        return data

    def read_into(self, rel: str, start: int, buffer: Any) -> int:
        """Read the bytes ``[start, start + len(buffer))`` of ``rel`` into ``buffer`` (any writable bytes-like
        object); how many were read, fewer only where the object ends first. Raises FileNotFoundError if missing.

        The same request as :meth:`read`, but the response is copied into ``buffer`` as it arrives, on S3 and GCS
        piece by piece (a restore's reader reuses its buffers: no new object per request)."""
        view = memoryview(buffer).cast("B")
        got = self._call(rel, lambda: self.backend.read_into(self.path(rel), start, view), reading=True)
        with self._stats_lock:
            self.bytes_read += got
            self.read_requests += 1
        return got

    def size(self, rel: str) -> int:
        """The size in bytes of ``rel`` (a fresh request, not a cached listing)."""
        return self._call(rel, lambda: self.backend.size(self.path(rel)), reading=True)

    def modified(self, rel: str) -> float | None:
        """The modification time of ``rel`` as a POSIX timestamp, or None where the backend has none."""
        return self._call(rel, lambda: self.backend.modified(self.path(rel)), reading=True)

    def list(self, rel_dir: str) -> list[str]:
        """Names (not paths) of the objects directly under ``rel_dir``; empty if it does not exist."""
        return sorted(self._call(rel_dir, lambda: self.backend.list(self.path(rel_dir)), reading=True))

    def list_sizes(self, rel_dir: str) -> dict[str, int]:
        """Name -> size in bytes of the objects directly under ``rel_dir`` (one listing); empty if it does not exist."""
        entries = self._call(rel_dir, lambda: self.backend.list(self.path(rel_dir)), reading=True)
        return {name: size for name, size in entries.items() if size is not None}

    def is_file(self, rel: str = "") -> bool:
        """Whether ``rel`` (the root itself by default) is a single object rather than a directory or nothing."""
        return self._call(rel, lambda: self.backend.is_file(self.path(rel)), reading=True)

    def exists(self, rel: str) -> bool:
        """Whether ``rel`` exists (a fresh check, not a cached listing)."""
        return self._call(rel, lambda: self.backend.exists(self.path(rel)), reading=True)

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
        reading: bool = False,
        retryable: Callable[[BaseException], bool] | None = None,
    ) -> T:
        """Run ``fn``, translating backend errors into bucketsnap's at this boundary.

        "Not found" and "exists" pass through for the protocol to interpret, except when ``writing``: a
        write that finds no parent directory is a storage failure, not a missing snapshot; and a missing
        bucket is never a missing object. On remote stores the store is reached first (see the module
        docstring), then failures that ``retryable`` accepts (by default: the backend's transient errors) are
        retried with :attr:`retry`. ``reading``: ``fn`` writes nothing (the advice when retries run out).
        """
        try:
            if not self.backend.remote:
                return fn()
            self._reach()
            return self.retry.call(
                fn,
                what=f"storage operation on {self.url_of(rel)}",
                retryable=retryable or self.backend.is_transient,
                advice="Retry later." if reading else "Retry later, or lower the upload concurrency.",
            )
        except FileNotFoundError as exc:
            found = self.backend.problem(exc)
            if found is not None and found.kind == "bucket":
                raise self._problem_error(found) from exc
            if not writing:
                raise
            raise StorageError(
                f"cannot write {self.url_of(rel)}: {_redacted(exc)}. Check that the location exists and is writable."
            ) from exc
        except (FileExistsError, BucketsnapError):
            raise
        except Exception as exc:
            found = self.backend.problem(exc)
            if found is not None:
                raise self._problem_error(found, self.url_of(rel)) from exc
            if isinstance(exc, PermissionError):
                raise StorageError(
                    f"permission denied on {self.url_of(rel)}: {exc}. Check the credentials and the bucket policy."
                ) from exc
            raise StorageError(
                f"storage operation on {self.url_of(rel)} failed: {type(exc).__name__}: {_redacted(exc)}"
            ) from exc

    # -- reaching the store --------------------------------------------------------------------------------

    def _reach(self) -> None:
        """Before this process's first request to the store (per endpoint and bucket), make sure it answers."""
        key = self._store_key
        if key in _reached:
            return
        with _PROBE_LOCK:
            lock = _reach_locks.setdefault(key, threading.Lock())
        with lock:  # concurrent first requests wait for one answer
            if key not in _reached:
                self._first_contact()
                _reached.add(key)

    def _first_contact(self) -> None:
        """List at most one object under the root, with :attr:`Retry.connect_timeout` in all.

        Raises:
            UnreachableError: no answer (refused, no such host, no answer in time) in ``connect_timeout``
                seconds or ``attempts`` tries.
            CredentialsError, BucketNotFoundError: the answer says so.
        """
        timeout = self.retry.connect_timeout
        start = time.monotonic()
        deadline = start + timeout
        last: BaseException | None = None
        tries = 0
        if self.backend.endpoint:
            self._refuse_if_nothing_listens(start, timeout)
        while tries < self.retry.attempts and (left := deadline - time.monotonic()) > 0:
            tries += 1
            try:
                found = _within(left, functools.partial(self.backend.reach, self.root, timeout=left))
            except Exception as exc:
                found = self.backend.problem(exc)
                if found is None:
                    if not self.backend.is_transient(exc):
                        return  # an answer this layer cannot read: the request itself will report it
                    last = exc
                    time.sleep(max(0.0, min(self.retry.delay(tries - 1), deadline - time.monotonic())))
                    continue
                if found.kind != "denied":
                    raise self._problem_error(found) from exc
                return
            if found is not None and found.kind != "denied":  # denied: the request itself says on what
                raise self._problem_error(found)
            return
        raise self._unreachable(last, tries, time.monotonic() - start) from last

    def _refuse_if_nothing_listens(self, start: float, timeout: float) -> None:
        """Fail at once where an explicit endpoint refuses TCP connections, :attr:`Retry.attempts` times over
        :data:`_REFUSED_PATIENCE` seconds (a local S3 server that was not started), instead of waiting out the
        store client's own retries. One TCP connection each try, to the endpoint only (never to a cloud's)."""
        address = self.backend.address()
        attempts = self.retry.attempts
        spacing = min(timeout, _REFUSED_PATIENCE) / max(1, attempts - 1)
        for tries in range(1, attempts + 1):
            why = diagnose(address, timeout=min(1.0, timeout)) if address else ""
            if not why.endswith("refused the connection (nothing listens there)"):
                return
            if tries < attempts:
                time.sleep(spacing)
        elapsed = time.monotonic() - start
        raise UnreachableError(
            f"{self.url}: cannot reach {self._server()}: {why} (failed {attempts} time{'s' if attempts != 1 else ''} "
            f"in {elapsed:.1f} s). Check the endpoint URL and that the server is running."
        ) from ConnectionRefusedError(errno.ECONNREFUSED, why)

    def _server(self) -> str:
        address = self.backend.address()
        if self.backend.endpoint:
            return f"the {self.backend.name} server at {address}"
        return f"{self.backend.name} ({address})" if address else self.backend.name

    def _unreachable(self, last: BaseException | None, tries: int, elapsed: float) -> UnreachableError:
        timeout = self.retry.connect_timeout
        address = self.backend.address()
        why = diagnose(address, timeout=min(2.0, timeout)) if address else ""
        if not why and last is not None and "Timeout" not in type(last).__name__:
            why = f"{type(last).__name__}: {_redacted(last)[:200]}"
        if not why:  # the connection itself works (or goes through a proxy)
            why = f"{urllib.parse.urlsplit(address).netloc or 'it'} sent no answer within {timeout:g} s"
        return UnreachableError(
            f"{self.url}: cannot reach {self._server()}: {why} (failed {tries} time{'s' if tries != 1 else ''} "
            f"in {elapsed:.1f} s){self.backend.caveat()}. Check the endpoint URL, the network and that the server "
            f"is running; Retry(connect_timeout=...) or --connect-timeout sets how long to wait ({timeout:g} s)."
        )

    def _problem_error(self, found: Problem, where: str | None = None) -> StorageError:
        word = self.backend.bucket_word
        bucket = self.backend.bucket(self.root)
        what = {
            "credentials": f"no {self.backend.name} credentials ({found.detail})",
            "rejected": f"{self._server()} refused the credentials ({found.detail})",
            "bucket": f"the {word} {bucket!r} does not exist at {self._server()} ({found.detail})",
            "denied": f"access denied on {where or self.url} ({found.detail})",
        }[found.kind]
        cls = {"credentials": CredentialsError, "rejected": CredentialsError, "bucket": BucketNotFoundError}
        return cls.get(found.kind, StorageError)(f"{self.url}: {what}. {self.backend.advice(found.kind)}")


#: Seconds over which an explicit endpoint's refusals are tried before its first request fails (a server
#: starting up opens its port within that; one that was never started never does).
_REFUSED_PATIENCE = 2.0


def _never(exc: BaseException) -> bool:
    return False


def _within(seconds: float, fn: Callable[[], T]) -> T:
    """``fn()``, or TimeoutError once ``seconds`` have passed without an answer.

    The clients' own timeouts do not bound a first request: gcsfs, for one, retries a refused connection for a
    minute whatever ``timeout`` it is given. A request still running when this gives up goes on in its daemon
    thread and its outcome is dropped; it is only ever the read-only first listing of a store.
    """
    outcome: list[Any] = []
    done = threading.Event()

    def run() -> None:
        try:
            outcome.append((True, fn()))
        except BaseException as exc:  # handed to the caller below
            outcome.append((False, exc))
        finally:
            done.set()

    threading.Thread(target=run, name="bucketsnap-first-contact", daemon=True).start()
    if not done.wait(max(0.0, seconds)):
        raise TimeoutError(f"no answer within {seconds:.1f} s")
    ok, value = outcome[0]
    if ok:
        return value  # type: ignore[no-any-return]
    raise value


def _refuse_malformed_scheme(url: str) -> None:
    """Refuse ``s3:/bucket/run``, ``gs:bucket``, ``s3//bucket`` or ``s3:://bucket``, alone or in a chain
    (``simplecache::s3:/bucket``): fsspec would take them for local paths (or ``s3`` for a chained protocol and
    ``//bucket`` for the path), and a save would write a folder in the working directory instead of the bucket;
    and refuse a bucket URL that names no bucket (``s3://``), or ``file://`` with no folder, before any
    request. Only the protocols bucketsnap has a backend for count (``data:run`` stays a local folder)."""
    parts = url.split("::")
    for i, part in enumerate(parts):
        scheme, colon, rest = part.partition(":")
        typo = re.fullmatch(r"([A-Za-z][A-Za-z0-9+.-]*)//(.*)", part)
        problem = "needs two slashes"
        if i and parts[i - 1].lower() in _MISTYPED_SCHEMES and part.startswith("//"):  # s3:://bucket
            scheme, rest, problem = parts[i - 1], part, "has one colon too many"
        elif not colon and typo and typo.group(1).lower() in _MISTYPED_SCHEMES:  # s3//bucket
            scheme, rest, problem = typo.group(1), typo.group(2), "needs a colon"
        elif not colon or scheme.lower() not in _MISTYPED_SCHEMES:
            continue  # a Windows drive (C:\\...), a local name with a colon, or no scheme at all
        elif rest.startswith("//"):
            _refuse_empty_location(scheme, rest[2:])
            continue  # a URL
        fixed = redact(f"{scheme}://{rest if scheme.lower() == 'file' else rest.lstrip('/')}")
        # The input itself is not shown: a mistyped URL may hold credentials in a form redact cannot see.
        raise ValueError(f"not a URL: {scheme}: {problem}; did you mean {fixed}?")


def _refuse_empty_location(scheme: str, rest: str) -> None:
    """Refuse ``s3://`` (or ``s3:///run``) with no bucket, and ``file://`` with no folder."""
    scheme = scheme.lower()
    if scheme in ("file", "local"):
        if not rest:
            raise ValueError(f"{scheme}:// names no folder: pass file:///absolute/path or a plain local path")
    elif scheme in _BUCKET_SCHEMES and not rest.split("/", 1)[0].rpartition("@")[2]:
        bucket = "container" if scheme in ("az", "abfs", "abfss") else "bucket"
        raise ValueError(f"{scheme}:// names no {bucket}: pass {scheme}://<{bucket}>/<run path>")


#: Schemes whose URLs start with a bucket (or container).
_BUCKET_SCHEMES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})


#: Schemes whose URLs are refused without their two slashes ("local" is left out: a folder may be called that).
_MISTYPED_SCHEMES = frozenset(p for p in known_protocols() if p != "local")


def _open_error(url: str, protocol: str, exc: ValueError) -> BucketsnapError:
    """The error for a URL fsspec cannot open: an unknown protocol (the nearest known one suggested), or the
    filesystem's own refusal of its options (a backend's advice on credentials where it is about them)."""
    message = _redacted(exc)
    if "Protocol not known" in message or "not known" in message.lower():
        known = [*known_protocols(), *sorted(fsspec.available_protocols())]
        nearest = _nearest(protocol, known)
        hint = f"did you mean {nearest}://?" if nearest else f"known protocols: {', '.join(known_protocols())}"
        return BucketsnapError(f"cannot open {url}: {protocol}:// is no protocol fsspec knows; {hint}")
    backend = backend_for(protocol)
    if any(word in message.lower() for word in ("credential", "account", "connection_string", "token", "key")):
        return CredentialsError(f"cannot open {url}: {message}. {backend.advice('credentials')}")
    return BucketsnapError(f"cannot open {url}: {message}")


def _nearest(word: str, candidates: list[str]) -> str | None:
    """The candidate closest to ``word`` in edits (a transposition is one), if close enough to be a typo.

    >>> _nearest("s4", ["file", "s3", "gs"]), _nearest("memroy", ["memory", "file"]), _nearest("xyz", ["s3"])
    ('s3', 'memory', None)
    """
    scored = [(_distance(word.lower(), c), c[:1] != word[:1], i, c) for i, c in enumerate(candidates)]
    best = min(scored, default=None)
    if best is None or best[0] > max(1, len(word) // 3):
        return None
    return best[3]


def _distance(a: str, b: str) -> int:
    """Edits (insert, delete, substitute, swap two neighbours) from ``a`` to ``b``."""
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[len(a)][len(b)]


def _redacted(exc: BaseException) -> str:
    return redact(str(exc))[:500]
