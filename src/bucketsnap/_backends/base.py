"""The backend contract: the few verbs the commit protocol needs of a store, and how its errors read.

A :class:`Backend` wraps one fsspec filesystem and speaks the filesystem's own paths. It knows how its store
gets each guarantee (an atomic exclusive create, a streamed write invisible until committed, an abort that
leaves nothing) and which of its errors are worth retrying; it knows nothing of runs, URLs or retries, which
:class:`bucketsnap._storage.Storage` adds on top for every backend alike.

This base class is itself the backend for any fsspec filesystem without a module of its own: reads, lists and
deletes through fsspec, streamed writes through ``fs.open(path, "wb")`` (discarded, not closed, on abort), and an
exclusive create that is fsspec's check-then-write (``atomic_create`` is False, so the storage warns).

A store that cannot be used at all is told apart from one that failed a request: :meth:`Backend.reach` makes
one small request that needs the server, the credentials and the bucket, and :meth:`Backend.problem` reads the
client's errors as a :class:`Problem` (no credentials, credentials refused, no such bucket, access denied),
for :class:`bucketsnap._storage.Storage` to say in one line, with :meth:`Backend.advice` on what to do.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any, ClassVar, Literal, Protocol

import fsspec
from fsspec.spec import AbstractBufferedFile

from bucketsnap._transport import Retry, ThreadedWriter, chain, copy_into, is_throttled, is_transient
from bucketsnap._uploads import PartUploader
from bucketsnap.errors import redact

__all__ = ["Backend", "FsspecWriter", "ObjectWriter", "PartWriter", "Problem", "timestamp"]

#: What can make a store unusable, as :class:`Problem` names it.
ProblemKind = Literal["credentials", "rejected", "bucket", "denied"]


@dataclass(frozen=True)
class Problem:
    """What a store's answer says is wrong, beyond one failed request.

    Attributes:
        kind: ``credentials`` (none were found), ``rejected`` (the store refused them), ``bucket`` (the bucket
            or container does not exist), ``denied`` (the credentials may not do this).
        detail: the store's own words, such as ``InvalidAccessKeyId``.
    """

    kind: ProblemKind
    detail: str


class ObjectWriter(Protocol):
    """One object being written: bytes go to :attr:`file`; it appears whole on :meth:`commit`, never on abort."""

    #: What the caller writes to (``write(data)``; a local file also has ``writev(pieces)``).
    file: Any

    def commit(self) -> None:
        """Make the object visible under its name, whole. Raises if it could not; then nothing is visible."""

    def abort(self) -> None:
        """Give the object up: nothing becomes visible under its name. Never raises."""


class Backend:
    """A store as the commit protocol sees it. Subclass it, override what the store does its own way, and
    register the subclass for its protocols with :func:`bucketsnap._backends.register`.

    Args:
        fs: the fsspec filesystem.
        part_size: bytes buffered per uploaded part (object stores).
        upload_concurrency: parts uploaded at once by one write (object stores with part uploads).
        retry: the retry policy for requests a writer sends itself (part uploads).
    """

    #: The store's name in messages.
    name: ClassVar[str] = "fsspec"
    #: Whether :meth:`create_exclusive` is refused when the name exists, even against a writer racing it.
    atomic_create: ClassVar[bool] = False
    #: The request condition that makes a create exclusive ("If-None-Match: *"), where the store's atomicity rests
    #: on a server honouring it: such a create is probed before a process first relies on it. None where the
    #: atomicity is the backend's own (a hard link, a lock) or where there is none.
    create_condition: ClassVar[str | None] = None
    #: Whether requests cross a network (then failures that :meth:`is_transient` accepts are retried).
    remote: ClassVar[bool] = True
    #: What a bucket is called in this store's messages.
    bucket_word: ClassVar[str] = "bucket"
    #: Fields of ``fs.info()`` that may hold the modification time, in the order they are tried.
    mtime_fields: ClassVar[tuple[str, ...]] = (
        "mtime",
        "LastModified",
        "last_modified",
        "updated",
        "created",
        "creation_time",
    )

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        *,
        part_size: int,
        upload_concurrency: int,
        retry: Retry,
    ) -> None:
        self.fs = fs
        self.part_size = part_size
        self.upload_concurrency = upload_concurrency
        self.retry = retry

    @classmethod
    def prepare_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """The storage options to make the filesystem with, given the user's: a backend may add defaults that
        make a store that cannot be used fail fast (what the user set always wins)."""
        return options

    @property
    def endpoint(self) -> str:
        """The endpoint the filesystem talks to, as passed in its options ("" for the service's default)."""
        options = getattr(self.fs, "storage_options", None) or {}
        client = options.get("client_kwargs") or {}
        endpoint = options.get("endpoint_url") or client.get("endpoint_url") or getattr(self.fs, "endpoint_url", None)
        return redact(str(endpoint)) if endpoint else ""

    def address(self) -> str:
        """The URL requests go to (the service's own where no endpoint was given), "" where there is none."""
        return self.endpoint

    def bucket(self, path: str) -> str:
        """The bucket (container) holding ``path``, "" on a store without buckets."""
        return ""

    def reach(self, path: str, *, timeout: float) -> Problem | None:
        """One small request that needs the server, the credentials and the bucket of ``path`` (a listing of
        at most one object under it), answered within ``timeout`` seconds (``FSTimeoutError`` otherwise).

        Returns the problem its answer shows where only this request can tell (a listing that finds no bucket),
        None where the store answered; raises what the client raises. This generic backend sends nothing: it
        does not know which request of an arbitrary filesystem is cheap.
        """
        return None

    def problem(self, exc: BaseException) -> Problem | None:
        """What ``exc`` (or an exception in its chain) says is wrong with the store, None for a failed request."""
        return None

    def caveat(self) -> str:
        """What else is wrong, for the message about a store that cannot be reached ("" if nothing)."""
        return ""

    @classmethod
    def advice(cls, kind: ProblemKind) -> str:
        """What to do about a :class:`Problem` of ``kind``, one sentence."""
        return {
            "credentials": "Pass the store's credentials as storage options (-s KEY=VALUE on the command line).",
            "rejected": "Check the credentials in the storage options and the environment.",
            "bucket": f"Check the {cls.bucket_word} name in the URL, or create the {cls.bucket_word}.",
            "denied": "Check what the credentials may do: bucketsnap lists, reads, writes and deletes under the run.",
        }[kind]

    # -- reading -------------------------------------------------------------------------------------------

    def read(self, path: str, start: int | None = None, end: int | None = None) -> bytes:
        """``path`` whole, or its bytes ``[start, end)``, fresh. Raises FileNotFoundError if missing.

        An open-ended read first drops what the filesystem remembers of ``path``: s3fs sizes such a read from its
        cached listing, in which an object created since (another process's manifest page) is missing.
        """
        if start is None or end is None:
            self.fs.invalidate_cache(path)
        return bytes(self.fs.cat_file(path, start=start, end=end))

    def read_into(self, path: str, start: int, buffer: memoryview) -> int:
        """Read the bytes ``[start, start + len(buffer))`` of ``path`` into ``buffer`` (writable bytes); how many
        were read, fewer only where the object ends first. Raises FileNotFoundError if missing, OSError where the
        server answers with more bytes than asked for.

        This generic version reads the range as :meth:`read` does and copies it in. S3 and GCS copy each piece of
        the response in as it arrives instead, so that a restore's ranged reads make no new object per request.
        """
        if not buffer.nbytes:
            return 0
        return copy_into(buffer, self.read(path, start, start + buffer.nbytes))

    def info(self, path: str) -> dict[str, Any]:
        """The store's own description of ``path``, fresh (never a cached listing). FileNotFoundError if missing."""
        self.fs.invalidate_cache(path)
        return dict(self.fs.info(path))

    def size(self, path: str) -> int:
        """The size of ``path`` in bytes, fresh."""
        return int(self.info(path)["size"])

    def modified(self, path: str) -> float | None:
        """When ``path`` was last written, as a POSIX timestamp; None only where the store keeps no such time."""
        return timestamp(self.info(path), self.mtime_fields)

    def list(self, path: str) -> dict[str, int | None]:
        """Name -> size of what is directly under ``path`` (None for a directory); empty if it does not exist."""
        self.fs.invalidate_cache(path)
        try:
            entries = self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return {}
        out: dict[str, int | None] = {}
        for entry in entries:
            name = str(entry["name"]).rstrip("/").rsplit("/", 1)[-1]
            if name:
                out[name] = int(entry["size"]) if entry.get("type") == "file" else None
        return out

    def exists(self, path: str) -> bool:
        """Whether ``path`` exists, fresh."""
        self.fs.invalidate_cache(path)
        return bool(self.fs.exists(path))

    def is_file(self, path: str) -> bool:
        """Whether ``path`` is one object (not a directory, not missing), fresh."""
        self.fs.invalidate_cache(path)
        return bool(self.fs.isfile(path))

    # -- writing -------------------------------------------------------------------------------------------

    def delete(self, path: str) -> None:
        """Delete ``path``; a missing object is not an error."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(path)
        self.fs.invalidate_cache(path)

    def create_exclusive(self, path: str, data: bytes, *, where: str) -> None:
        """Create ``path`` holding ``data`` (``where`` is its URL, for messages); FileExistsError if it exists."""
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            raise
        except Exception as exc:  # each client reports a failed precondition its own way
            if self.is_precondition_failure(exc):
                raise FileExistsError(where) from exc
            raise
        finally:
            self.fs.invalidate_cache(path)

    def open_writer(self, path: str, *, where: str) -> ObjectWriter:
        """Start a streamed write of ``path`` (``where`` is its URL, for messages)."""
        return FsspecWriter(self.fs, path, part_size=self.part_size)

    def prepare_directory(self, path: str, *, root: str) -> None:
        """Make sure objects can be created in directory ``path`` under the run's ``root`` (object stores have no
        directories: nothing to do)."""

    # -- errors --------------------------------------------------------------------------------------------

    @classmethod
    def vendor_transient(cls, exc: BaseException) -> bool:
        """Whether ``exc`` itself (not its chain) is the store client's own way of saying "try again"."""
        return False

    @classmethod
    def vendor_throttled(cls, exc: BaseException) -> bool:
        """Whether ``exc`` itself is the store client's own way of saying "too many requests"."""
        return False

    @classmethod
    def is_transient(cls, exc: BaseException) -> bool:
        """Whether ``exc`` is worth retrying: throttling, a 5xx answer, a reset or refused connection, a timeout."""
        return is_transient(exc, cls.vendor_transient)

    @classmethod
    def is_throttled(cls, exc: BaseException) -> bool:
        """Whether the server refused ``exc``'s request for load, so it certainly did not apply it."""
        return is_throttled(exc, cls.vendor_throttled)

    @classmethod
    def is_precondition_failure(cls, exc: BaseException) -> bool:
        """Whether ``exc`` says a conditional create found the name taken: an HTTP 412 in the error's own status
        field, or a precondition error code. Never a bare "412" in the text, which a port, a request id or a
        host name may hold."""
        for e in chain(exc):
            response = getattr(e, "response", None)
            statuses = [getattr(e, "status_code", None), getattr(e, "status", None), getattr(e, "code", None)]
            if isinstance(response, dict):
                statuses.append((response.get("ResponseMetadata") or {}).get("HTTPStatusCode"))
                statuses.append((response.get("Error") or {}).get("Code"))
            if 412 in statuses or any(str(s) in _PRECONDITION_CODES for s in statuses if s is not None):
                return True
            text = f"{type(e).__name__} {e}"
            if any(code in text for code in _PRECONDITION_CODES) or _PRECONDITION_TEXT.search(text):
                return True
        return False


#: Error codes of a failed precondition: S3's, GCS's (JSON API) and Azure's.
_PRECONDITION_CODES = ("PreconditionFailed", "conditionNotMet", "ConditionNotMet")
#: An HTTP status line saying so ("412 Precondition Failed"), as some clients put it in their messages.
_PRECONDITION_TEXT = re.compile(r"\b412\b\W{0,3}(Precondition|Conditional)", re.IGNORECASE)


class FsspecWriter:
    """fsspec's own writer behind a thread (the next part is produced while this one is stored).

    A failed write is discarded, not closed: closing would complete a multipart or resumable upload with partial
    data.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, *, part_size: int) -> None:
        self._fs, self._path = fs, path
        self._f: IO[bytes] = fs.open(path, "wb", block_size=part_size)
        f = self._f
        self.file = ThreadedWriter(f, part_size=part_size)

    def commit(self) -> None:
        try:
            self.file.close()
        except BaseException:
            self.abort()
            raise
        self._f.close()  # not retried: it may have completed

    def abort(self) -> None:
        self.file.abort()
        f = self._f
        if isinstance(f, AbstractBufferedFile):  # uploads on flush: discard aborts the multipart/resumable upload
            with contextlib.suppress(Exception):
                f.discard()
            # Mark it closed: s3fs's discard leaves it open and gcsfs's does nothing before the first part, so a
            # later close() (even the garbage collector's) would publish the partial object.
            f.closed = True
            return
        # Any other file object writes through (the memory filesystem's even publishes on open): keep its close
        # from publishing more, and remove what it wrote. The name is this write's own (a save names its objects
        # with its token), and opening it for writing replaced whatever was there anyway.
        f.close = _nothing  # type: ignore[method-assign]
        with contextlib.suppress(Exception):
            self._fs.rm_file(self._path)


class PartWriter:
    """A part uploader (:mod:`bucketsnap._uploads`) as an :class:`ObjectWriter`: closing it publishes the object."""

    def __init__(self, uploader: PartUploader[Any]) -> None:
        self.file = uploader

    def commit(self) -> None:
        self.file.close()  # retries its own requests

    def abort(self) -> None:
        self.file.abort()


def _nothing() -> None:
    pass


def timestamp(info: dict[str, Any], fields: Iterable[str]) -> float | None:
    """The first of ``fields`` in ``info`` that reads as a time, as a POSIX timestamp."""
    for field in fields:
        value = info.get(field)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, datetime):
            return value.timestamp()
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    return None
