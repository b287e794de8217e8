"""Moving bytes to and from object stores: retries with backoff, concurrent multipart uploads, pipelined writes.

Three pieces, used by :mod:`bucketsnap.storage`:

* :class:`Retry` runs a callable again after a *transient* failure (throttling such as S3's ``SlowDown`` or
  HTTP 429, 5xx responses, a reset or refused connection, a timeout), sleeping with capped exponential backoff
  and full jitter, and gives up after a fixed number of attempts. What counts as transient is decided by
  :func:`is_transient`, which reads the exception chain: s3fs turns ``SlowDown`` into ``OSError(EBUSY)`` and a
  500 into ``OSError(EREMOTEIO)``, botocore and aiohttp have their own connection error classes, gcsfs raises
  ``HttpError`` with a ``code``. The clients below already retry a few times on their own; this layer adds
  patience for longer bursts and a single, clear error at the end.
* :class:`S3MultipartWriter` streams an object to S3 as a multipart upload whose parts are uploaded by a
  thread pool, ``concurrency`` at a time, while the caller goes on producing the next part. The producer
  blocks when ``concurrency`` parts are in flight, so a writer holds at most ``concurrency + 1`` parts in
  memory, whatever the object's size. The object becomes visible only when ``complete_multipart_upload``
  succeeds; :meth:`~S3MultipartWriter.abort` (any failure, or the caller raising) aborts the upload, so
  nothing partial is ever published. An object smaller than one part is sent as one ``put_object``.
  s3fs's own writer (``fs.open(path, "wb")``) uploads each part synchronously, in the writing thread, one at a
  time; that is why bucketsnap drives the multipart upload itself through s3fs's ``call_s3``.
* :class:`ThreadedWriter` puts a background thread in front of any other file object (gcsfs's resumable
  upload, whose chunks must be sent in order), so that compressing the next part overlaps uploading this one.

Trade-off: parts are copied once into their buffer (a part must be one contiguous body), so a remote save costs
one extra pass over its bytes in memory; local saves do not go through this module.
"""

from __future__ import annotations

import errno
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Any, TypeVar

from bucketsnap.errors import StorageError, redact

__all__ = ["Retry", "S3MultipartWriter", "ThreadedWriter", "is_transient"]

logger = logging.getLogger("bucketsnap")

T = TypeVar("T")

#: S3 refuses parts smaller than this (except the last one).
S3_MIN_PART_SIZE = 5 * 2**20
_S3_MAX_PARTS = 10_000

_TRANSIENT_ERRNOS = {
    errno.EBUSY,  # s3fs: SlowDown, 503
    getattr(errno, "EREMOTEIO", 121),  # s3fs: InternalError, 500
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.ECONNREFUSED,
    errno.EPIPE,
    errno.EAGAIN,
}
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "TooManyRequests",
    "RequestTimeout",
    "RequestTimeoutException",
    "InternalError",
    "ServiceUnavailable",
    "500",
    "502",
    "503",
    "504",
}
_TRANSIENT_CLASS_NAMES = {
    # botocore
    "EndpointConnectionError",
    "ConnectionClosedError",
    "ReadTimeoutError",
    "ConnectTimeoutError",
    "ResponseStreamingError",
    "IncompleteReadError",
    # aiohttp
    "ClientConnectionError",
    "ClientOSError",
    "ServerDisconnectedError",
    "ClientPayloadError",
    "ServerTimeoutError",
    # fsspec
    "FSTimeoutError",
}


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception in its chain) is worth retrying: throttling, 5xx, connection, timeout.

    Not found, exists, permission and precondition failures are never transient.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (FileNotFoundError, FileExistsError, PermissionError)):
            return False
        if isinstance(current, (ConnectionError, TimeoutError)):
            return True
        if isinstance(current, OSError) and current.errno in _TRANSIENT_ERRNOS:
            return True
        if any(cls.__name__ in _TRANSIENT_CLASS_NAMES for cls in type(current).__mro__):
            return True
        response = getattr(current, "response", None)  # botocore ClientError
        if isinstance(response, dict):
            error = response.get("Error") or {}
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            if error.get("Code") in _TRANSIENT_CODES or status == 429 or (isinstance(status, int) and status >= 500):
                return True
        code = getattr(current, "code", None)  # gcsfs HttpError
        if isinstance(code, int) and (code == 429 or 500 <= code < 600):
            return True
        current = current.__cause__ or current.__context__
    return False


def is_throttled(exc: BaseException) -> bool:
    """Whether the server refused ``exc``'s request for load (so it certainly did not apply it)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = f"{type(current).__name__} {current}"
        if any(word in text for word in ("SlowDown", "Throttl", "TooManyRequests", "reduce your request rate")):
            return True
        response = getattr(current, "response", None)
        if isinstance(response, dict) and (response.get("ResponseMetadata") or {}).get("HTTPStatusCode") == 429:
            return True
        if getattr(current, "code", None) == 429:
            return True
        current = current.__cause__ or current.__context__
    return False


@dataclass(frozen=True)
class Retry:
    """Retry transient failures with capped exponential backoff and full jitter.

    Attributes:
        attempts: tries in all (1: no retry).
        initial: the first backoff, in seconds; each next one doubles, up to ``max_delay``.
        max_delay: the longest sleep between two tries.
    """

    attempts: int = 5
    initial: float = 0.25
    max_delay: float = 8.0

    def delay(self, attempt: int) -> float:
        """The sleep after failed try number ``attempt`` (0-based): uniform in [0, min(max, initial * 2**n)]."""
        return random.uniform(0, min(self.max_delay, self.initial * 2**attempt))

    def call(
        self,
        fn: Callable[[], T],
        *,
        what: str,
        retryable: Callable[[BaseException], bool] = is_transient,
    ) -> T:
        """Run ``fn``; on a failure ``retryable`` accepts, sleep and try again, up to :attr:`attempts` tries.

        Raises:
            StorageError: the last failure was retryable but the attempts ran out (its cause is that failure).
            Exception: a failure that is not retryable, unchanged.
        """
        for attempt in range(self.attempts):
            try:
                return fn()
            except Exception as exc:
                if not retryable(exc):
                    raise
                if attempt + 1 == self.attempts:
                    raise StorageError(
                        f"{what} failed {self.attempts} times with transient errors, last: {type(exc).__name__}: "
                        f"{redact(str(exc))[:300]}. The store may be throttling or unreachable; committed "
                        "snapshots are intact. Retry later, or lower the upload concurrency."
                    ) from exc
                sleep = self.delay(attempt)
                logger.warning("%s: transient %s, retrying in %.2fs: %s", what, type(exc).__name__, sleep, exc)
                time.sleep(sleep)
        raise AssertionError("unreachable")  # pragma: no cover


class S3MultipartWriter:
    """A write-only file object streaming to one S3 key with concurrent part uploads.

    Args:
        fs: an ``s3fs.S3FileSystem``.
        path: ``bucket/key``.
        part_size: bytes per part (at least 5 MiB, S3's minimum).
        concurrency: parts uploaded at once.
        retry: the retry policy for each request.
        where: the redacted URL, for messages.
    """

    def __init__(self, fs: Any, path: str, *, part_size: int, concurrency: int, retry: Retry, where: str) -> None:
        if concurrency < 1:
            raise ValueError(f"upload concurrency must be at least 1, not {concurrency}")
        self._fs = fs
        self._bucket, self._key, _ = fs.split_path(path)
        self._part_size = max(part_size, S3_MIN_PART_SIZE)
        self._retry = retry
        self._where = where
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[Future[dict[str, Any]]] = []
        self._slots = threading.BoundedSemaphore(concurrency)
        self._pool: ThreadPoolExecutor | None = None
        self._concurrency = concurrency
        self._failed: BaseException | None = None
        self.closed = False
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        """Buffer ``data``; hand each full part to the upload pool (blocks while all uploaders are busy)."""
        if self.closed:
            raise ValueError(f"write to a closed upload of {self._where}")
        self._check_failed()
        view = memoryview(data).cast("B")
        n = view.nbytes
        self.size += n
        while view.nbytes:
            take = min(self._part_size - len(self._buffer), view.nbytes)
            self._buffer += view[:take]
            view = view[take:]
            if len(self._buffer) >= self._part_size:
                self._submit(self._buffer)
                self._buffer = bytearray()
        return n

    def flush(self) -> None:
        pass

    def close(self) -> None:
        """Upload what is buffered and complete the upload: the object appears whole, now."""
        if self.closed:
            return
        try:
            if self._upload_id is None:  # smaller than one part: one request, visible when it returns
                body = self._buffer
                self._call("put", lambda: self._fs.call_s3("put_object", Bucket=self._bucket, Key=self._key, Body=body))
            else:
                if self._buffer or not self._parts:
                    self._submit(self._buffer)
                self._buffer = bytearray()
                parts = [f.result() for f in self._parts]  # raises the first failed part's error
                upload_id = self._upload_id
                self._call(
                    "complete",
                    lambda: self._fs.call_s3(
                        "complete_multipart_upload",
                        Bucket=self._bucket,
                        Key=self._key,
                        UploadId=upload_id,
                        MultipartUpload={"Parts": parts},
                    ),
                )
                self._upload_id = None
        except BaseException:
            self.abort()
            raise
        self.closed = True
        self._shutdown()
        self._fs.invalidate_cache(f"{self._bucket}/{self._key}")

    def abort(self) -> None:
        """Abort the upload (nothing is published) and drop the buffers; never raises."""
        self.closed = True
        self._buffer = bytearray()
        for future in self._parts:
            future.cancel()
        self._shutdown()
        upload_id, self._upload_id = self._upload_id, None
        if upload_id is None:
            return
        try:
            self._call(
                "abort",
                lambda: self._fs.call_s3(
                    "abort_multipart_upload", Bucket=self._bucket, Key=self._key, UploadId=upload_id
                ),
            )
        except Exception as exc:  # an unaborted upload is invisible; a bucket lifecycle rule removes it
            logger.warning("could not abort the multipart upload of %s: %s", self._where, exc)

    def _submit(self, part: bytearray) -> None:
        if self._upload_id is None:
            created = self._call(
                "create", lambda: self._fs.call_s3("create_multipart_upload", Bucket=self._bucket, Key=self._key)
            )
            self._upload_id = str(created["UploadId"])
            self._pool = ThreadPoolExecutor(self._concurrency, thread_name_prefix="bucketsnap-upload")
        number = len(self._parts) + 1
        if number > _S3_MAX_PARTS:
            raise StorageError(
                f"{self._where} needs more than {_S3_MAX_PARTS} parts of {self._part_size} bytes; "
                "pass a larger part_size"
            )
        self._slots.acquire()  # at most `concurrency` parts in flight: bounds memory
        self._check_failed(release=True)
        assert self._pool is not None
        try:
            future = self._pool.submit(self._upload_part, number, part)
        except BaseException:
            self._slots.release()
            raise
        self._parts.append(future)

    def _upload_part(self, number: int, body: bytearray) -> dict[str, Any]:
        upload_id = self._upload_id
        try:
            out = self._call(
                f"part {number}",
                lambda: self._fs.call_s3(
                    "upload_part",
                    Bucket=self._bucket,
                    Key=self._key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=body,  # bytearray is accepted as is: no copy
                ),
            )
        except BaseException as exc:
            self._failed = self._failed or exc
            raise
        finally:
            self._slots.release()
        part = {"PartNumber": number, "ETag": out["ETag"]}
        if "ChecksumSHA256" in out:
            part["ChecksumSHA256"] = out["ChecksumSHA256"]
        return part

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        return self._retry.call(fn, what=f"upload of {self._where} ({what})")

    def _check_failed(self, *, release: bool = False) -> None:
        failed = self._failed
        if failed is None:
            return
        if release:
            self._slots.release()
        if isinstance(failed, StorageError):
            raise failed
        raise StorageError(
            f"upload of {self._where} failed: {type(failed).__name__}: {redact(str(failed))[:300]}. Nothing was "
            "committed; committed snapshots are intact."
        ) from failed

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class ThreadedWriter:
    """Writes to ``dest`` from a background thread, so producing the next part overlaps storing this one.

    At most ``depth`` parts of ``part_size`` bytes wait in the queue, plus the one being filled.

    Args:
        dest: the file object to write (not closed here).
        part_size: bytes handed to the thread at a time.
        depth: parts that may wait for the thread.
    """

    def __init__(self, dest: IO[bytes], *, part_size: int, depth: int = 2) -> None:
        self._dest = dest
        self._part_size = part_size
        self._buffer = bytearray()
        self._queue: queue.Queue[bytearray | None] = queue.Queue(maxsize=max(1, depth))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="bucketsnap-writer", daemon=True)
        self._thread.start()
        self.closed = False

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._check()
        view = memoryview(data).cast("B")
        self._buffer += view
        if len(self._buffer) >= self._part_size:
            self._put(self._buffer)  # handed over, not copied: a new buffer follows
            self._buffer = bytearray()
        return view.nbytes

    def flush(self) -> None:
        pass

    def close(self) -> None:
        """Hand over the rest and wait until the thread has written everything; raise its error."""
        if self.closed:
            return
        self.closed = True
        if self._buffer:
            self._put(self._buffer)
        self._buffer = bytearray()
        self._put(None)
        self._thread.join()
        self._check()

    def abort(self) -> None:
        """Stop the thread without writing what is queued; never raises."""
        self.closed = True
        self._error = self._error or RuntimeError("aborted")
        while True:  # unblock a producer-side put and let the thread see the end
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(None)
        self._thread.join()

    def _put(self, item: bytearray | None) -> None:
        while True:
            self._check()
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue  # drain without writing
            try:
                self._dest.write(item)
            except BaseException as exc:
                self._error = exc

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
