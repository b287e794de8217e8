"""Concurrent part uploads to object stores: the engine that S3 multipart, GCS composite and Azure block uploads share.

A :class:`PartUploader` is a write-only file object that cuts the stream into parts and uploads ``concurrency``
parts at a time from a thread pool while the caller goes on producing the next part. The producer blocks when
``concurrency`` parts are in flight, so a writer holds at most ``concurrency + 1`` parts in memory, whatever the
object's size. The object becomes visible whole, or never: any failure, or the caller raising, calls
:meth:`~PartUploader.abort`. An object smaller than one part is sent as one request. Each backend module says
how a part is uploaded and how the parts are published (:mod:`bucketsnap._backends.s3`,
:mod:`bucketsnap._backends.gcs`, :mod:`bucketsnap._backends.azure`).

Trade-off: parts are copied once into their buffer (a part must be one contiguous body), so a remote save costs
one extra pass over its bytes in memory; local saves do not go through this module. The buffers are allocated at
their full size and reused once their part is uploaded (at most ``concurrency + 1`` of them per writer): growing a
fresh buffer for every part cost the page faults of the whole object again, about as much CPU as the copy itself,
on the cores the upload's client and the training loop need. A part goes to the store's client as a
:class:`PartBody`, a file object over its buffer, so that the client reads it in chunks instead of copying it.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

from bucketsnap._pools import Pool
from bucketsnap._transport import Retry, is_transient
from bucketsnap.errors import StorageError, redact

__all__ = ["PartBody", "PartUploader"]

logger = logging.getLogger("bucketsnap")

T = TypeVar("T")
P = TypeVar("P")


class PartBody(io.RawIOBase):
    """A part's buffer as a read-only, seekable file object, which an HTTP client sends in small reads.

    Handed a bytes-like body, aiohttp (under s3fs and aiobotocore) keeps copies of the whole part while it sends
    it: a slice of a ``bytearray`` (a copy, where one of ``bytes`` is not), the headers joined to the body on
    Python < 3.12.9, and the socket transport's buffer of what the kernel did not take at once; over HTTPS
    botocore also wraps it in a ``BytesIO`` (another copy) for its checksum trailer. Handed a file object, aiohttp
    and botocore read it in chunks of 256 KiB to 1 MiB and seek back to resend, so that a request holds the part
    once (this buffer) plus a few chunks. Each read copies its chunk out of a memoryview released at once: no
    export outlives the call, so the uploader may resize or refill the buffer once its request has returned.
    """

    def __init__(self, buffer: bytearray) -> None:
        super().__init__()
        self._buffer = buffer
        self._size = len(buffer)
        self._pos = 0

    def __len__(self) -> int:
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        start = min(self._pos, self._size)
        end = self._size if size is None or size < 0 else min(self._size, start + size)
        with memoryview(self._buffer) as view:
            chunk = bytes(view[start:end])
        self._pos = max(self._pos, end)
        return chunk

    def readinto(self, target: Any) -> int:
        with memoryview(target) as out, memoryview(self._buffer) as view:
            out = out.cast("B")
            start = min(self._pos, self._size)
            n = min(out.nbytes, self._size - start)
            out[:n] = view[start : start + n]
        self._pos = start + n
        return n


class PartUploader(Generic[P]):
    """A write-only file object uploading parts ``concurrency`` at a time; subclasses say how (``P``: what an
    uploaded part returns, which :meth:`_complete` needs).

    Args:
        part_size: bytes per part.
        concurrency: parts uploaded at once.
        retry: the retry policy for each request.
        where: the redacted URL, for messages.
    """

    def __init__(
        self,
        *,
        part_size: int,
        concurrency: int,
        retry: Retry,
        where: str,
        retryable: Callable[[BaseException], bool] = is_transient,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"upload concurrency must be at least 1, not {concurrency}")
        self._part_size = part_size
        self._retry = retry
        self._retryable = retryable
        self._where = where
        self._buffer = bytearray()
        self._filled = 0  # bytes of self._buffer written so far
        self._free: list[bytearray] = []  # buffers whose part was uploaded, for the next parts
        self._parts: list[Future[P]] = []
        self._slots = threading.BoundedSemaphore(concurrency)
        self._pool: Pool | None = None
        self._concurrency = concurrency
        self._failed: BaseException | None = None
        self._started = False
        self.closed = False
        self.size = 0

    # -- what each store does ------------------------------------------------------------------------------

    def _start(self) -> None:
        """Called before the first part is uploaded."""

    def _upload_part(self, number: int, body: bytearray) -> P:
        raise NotImplementedError

    def _complete(self, parts: list[P]) -> None:
        """Publish the object from its uploaded parts."""
        raise NotImplementedError

    def _put_whole(self, body: bytearray) -> None:
        """Publish an object smaller than one part in one request."""
        raise NotImplementedError

    def _discard(self) -> None:
        """Undo what :meth:`_start` and the uploaded parts left; may raise (then it is logged)."""

    def _next_part_size(self, number: int) -> int:
        """The size of part ``number`` (1-based); raise StorageError past the store's limit on parts."""
        return self._part_size

    # -- the file object -----------------------------------------------------------------------------------

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
            part_size = self._next_part_size(len(self._parts) + 1)
            if not self._buffer:  # a new part
                self._buffer = self._new_buffer(part_size)
            take = min(part_size - self._filled, view.nbytes)
            self._buffer[self._filled : self._filled + take] = view[:take]
            self._filled += take
            view = view[take:]
            if self._filled == part_size:
                self._submit(self._buffer)
                self._buffer, self._filled = bytearray(), 0
        return n

    def flush(self) -> None:
        pass

    def close(self) -> None:
        """Upload what is buffered and publish the object: it appears whole, now."""
        if self.closed:
            return
        try:
            del self._buffer[self._filled :]  # the last part's own size (in place: no copy)
            if not self._started:  # smaller than one part: one request, visible when it returns
                self._put_whole(self._buffer)
            else:
                if self._buffer:
                    self._submit(self._buffer)
                self._buffer, self._filled, self._free = bytearray(), 0, []
                self._complete([f.result() for f in self._parts])  # raises the first failed part's error
                self._started = False
        except BaseException:
            self.abort()
            raise
        self.closed = True
        self._shutdown()

    def abort(self) -> None:
        """Publish nothing and drop the buffers; never raises."""
        self.closed = True
        self._buffer, self._filled, self._free = bytearray(), 0, []
        for future in self._parts:
            future.cancel()
        self._shutdown()
        if not self._started:
            return
        self._started = False
        try:
            self._discard()
        except Exception as exc:
            logger.warning("could not clean up the failed upload of %s: %s", self._where, exc)

    # -- helpers -------------------------------------------------------------------------------------------

    def _submit(self, part: bytearray) -> None:
        if not self._started:
            self._start()
            self._started = True
            self._pool = Pool(self._concurrency, thread_name_prefix="bucketsnap-upload")
        number = len(self._parts) + 1
        self._slots.acquire()  # at most `concurrency` parts in flight: bounds memory
        self._check_failed(release=True)
        assert self._pool is not None
        try:
            future = self._pool.submit(self._run_part, number, part)
        except BaseException:
            self._slots.release()
            raise
        self._parts.append(future)

    def _new_buffer(self, size: int) -> bytearray:
        """A buffer of ``size`` bytes for the next part: an uploaded part's if one has that size, else a new one.

        Called once the previous part holds its slot: with ``concurrency`` parts in flight and none free, this
        is buffer ``concurrency + 1``, the most a writer allocates.
        """
        for i, buffer in enumerate(self._free):  # uploader threads only append, so index i stays this buffer
            if len(buffer) == size:
                return self._free.pop(i)
        return bytearray(size)

    def _run_part(self, number: int, body: bytearray) -> P:
        try:
            out = self._upload_part(number, body)
        except BaseException as exc:
            self._failed = self._failed or exc
            self._slots.release()
            raise
        self._free.append(body)  # before the slot goes: the producer takes this buffer instead of a new one
        self._slots.release()
        return out

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        return self._retry.call(fn, what=f"upload of {self._where} ({what})", retryable=self._retryable)

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
