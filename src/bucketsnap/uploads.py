"""Concurrent part uploads to object stores: S3 multipart uploads and GCS parallel composite uploads.

Both writers are write-only file objects that cut the stream into parts and upload ``concurrency`` parts at a
time from a thread pool while the caller goes on producing the next part. The producer blocks when
``concurrency`` parts are in flight, so a writer holds at most ``concurrency + 1`` parts in memory, whatever the
object's size. The object becomes visible whole, or never: any failure, or the caller raising, calls
:meth:`~PartUploader.abort`. An object smaller than one part is sent as one request.

* :class:`S3MultipartWriter` drives an S3 multipart upload through s3fs's ``call_s3``; s3fs's own writer
  (``fs.open(path, "wb")``) uploads each part synchronously, one at a time. The object appears when
  ``complete_multipart_upload`` succeeds; an aborted upload leaves nothing.
* :class:`GcsComposeWriter` is GCS's parallel composite upload (what ``gcloud storage cp`` does for large
  files): each part is uploaded as an object of its own beside the destination (``<name>.<token>.part00001``,
  ..., the token unique to the writer), and one ``compose`` request (a tree of them past 32 parts) joins them
  into the destination, which appears whole when it succeeds; the part objects are then deleted. gcsfs's
  writer is a resumable upload, whose chunks must be sent in order, one at a time. Trade-offs: a composite
  object has a CRC32C but no MD5 hash, and deleting its parts right away incurs early-deletion charges in
  Nearline, Coldline and Archive buckets or is refused under a retention policy; pass
  ``upload_concurrency=1`` to such a bucket's store to keep the resumable upload. Part objects left by a
  crashed save sit beside the object (in ``snapshots/`` or ``chunks/``), where ``gc`` removes them. Parts
  double in size every 256 parts, so an object over 4 GiB (with 16 MiB parts) holds larger part buffers.

Trade-off: parts are copied once into their buffer (a part must be one contiguous body), so a remote save costs
one extra pass over its bytes in memory; local saves do not go through this module.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

from bucketsnap.errors import StorageError, redact
from bucketsnap.transport import Retry

__all__ = ["GCS_COMPOSE_LIMIT", "GcsComposeWriter", "PartUploader", "S3MultipartWriter"]

logger = logging.getLogger("bucketsnap")

T = TypeVar("T")
P = TypeVar("P")

#: S3 refuses parts smaller than this (except the last one).
S3_MIN_PART_SIZE = 5 * 2**20
_S3_MAX_PARTS = 10_000
#: Source objects one GCS ``compose`` request accepts.
GCS_COMPOSE_LIMIT = 32
#: Components a GCS composite object may have.
_GCS_MAX_COMPONENTS = 1024
#: GCS parts double in size every this many parts, so that 1024 parts of 16 MiB and up cover 60 GiB.
_GCS_PARTS_PER_SIZE = 256


class PartUploader(Generic[P]):
    """A write-only file object uploading parts ``concurrency`` at a time; subclasses say how (``P``: what an
    uploaded part returns, which :meth:`_complete` needs).

    Args:
        part_size: bytes per part.
        concurrency: parts uploaded at once.
        retry: the retry policy for each request.
        where: the redacted URL, for messages.
    """

    def __init__(self, *, part_size: int, concurrency: int, retry: Retry, where: str) -> None:
        if concurrency < 1:
            raise ValueError(f"upload concurrency must be at least 1, not {concurrency}")
        self._part_size = part_size
        self._retry = retry
        self._where = where
        self._buffer = bytearray()
        self._parts: list[Future[P]] = []
        self._slots = threading.BoundedSemaphore(concurrency)
        self._pool: ThreadPoolExecutor | None = None
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
            take = min(part_size - len(self._buffer), view.nbytes)
            self._buffer += view[:take]
            view = view[take:]
            if len(self._buffer) >= part_size:
                self._submit(self._buffer)
                self._buffer = bytearray()
        return n

    def flush(self) -> None:
        pass

    def close(self) -> None:
        """Upload what is buffered and publish the object: it appears whole, now."""
        if self.closed:
            return
        try:
            if not self._started:  # smaller than one part: one request, visible when it returns
                self._put_whole(self._buffer)
            else:
                if self._buffer:
                    self._submit(self._buffer)
                self._buffer = bytearray()
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
        self._buffer = bytearray()
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
            self._pool = ThreadPoolExecutor(self._concurrency, thread_name_prefix="bucketsnap-upload")
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

    def _run_part(self, number: int, body: bytearray) -> P:
        try:
            return self._upload_part(number, body)
        except BaseException as exc:
            self._failed = self._failed or exc
            raise
        finally:
            self._slots.release()

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


class S3MultipartWriter(PartUploader[dict[str, Any]]):
    """Streams one S3 key as a multipart upload with concurrent part uploads.

    Args:
        fs: an ``s3fs.S3FileSystem``.
        path: ``bucket/key``.
        part_size: bytes per part (at least 5 MiB, S3's minimum).
        concurrency: parts uploaded at once.
        retry: the retry policy for each request.
        where: the redacted URL, for messages.
    """

    def __init__(self, fs: Any, path: str, *, part_size: int, concurrency: int, retry: Retry, where: str) -> None:
        super().__init__(part_size=max(part_size, S3_MIN_PART_SIZE), concurrency=concurrency, retry=retry, where=where)
        self._fs = fs
        self._bucket, self._key, _ = fs.split_path(path)
        self._upload_id: str | None = None

    def close(self) -> None:
        super().close()
        self._fs.invalidate_cache(f"{self._bucket}/{self._key}")

    def _next_part_size(self, number: int) -> int:
        if number > _S3_MAX_PARTS:
            raise StorageError(
                f"{self._where} needs more than {_S3_MAX_PARTS} parts of {self._part_size} bytes; "
                "pass a larger part_size"
            )
        return self._part_size

    def _start(self) -> None:
        created = self._call(
            "create", lambda: self._fs.call_s3("create_multipart_upload", Bucket=self._bucket, Key=self._key)
        )
        self._upload_id = str(created["UploadId"])

    def _put_whole(self, body: bytearray) -> None:
        self._call("put", lambda: self._fs.call_s3("put_object", Bucket=self._bucket, Key=self._key, Body=body))

    def _upload_part(self, number: int, body: bytearray) -> dict[str, Any]:
        out = self._call(
            f"part {number}",
            lambda: self._fs.call_s3(
                "upload_part",
                Bucket=self._bucket,
                Key=self._key,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=body,  # bytearray is accepted as is: no copy
            ),
        )
        part = {"PartNumber": number, "ETag": out["ETag"]}
        if "ChecksumSHA256" in out:
            part["ChecksumSHA256"] = out["ChecksumSHA256"]
        return part

    def _complete(self, parts: list[dict[str, Any]]) -> None:
        self._call(
            "complete",
            lambda: self._fs.call_s3(
                "complete_multipart_upload",
                Bucket=self._bucket,
                Key=self._key,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": parts},
            ),
        )

    def _discard(self) -> None:
        # an unaborted upload is invisible; a bucket lifecycle rule (AbortIncompleteMultipartUpload) removes it
        self._call(
            "abort",
            lambda: self._fs.call_s3(
                "abort_multipart_upload", Bucket=self._bucket, Key=self._key, UploadId=self._upload_id
            ),
        )


class GcsComposeWriter(PartUploader[str]):
    """Streams one GCS object as a parallel composite upload: part objects uploaded concurrently, then composed.

    Parts double in size every 256 parts (GCS allows 1024 components), so an object of any size a snapshot
    can hold fits while small parts keep memory low.

    Args:
        fs: a ``gcsfs.GCSFileSystem``.
        path: ``bucket/key``.
        part_size: bytes per part (the first 256 parts).
        concurrency: parts uploaded at once.
        retry: the retry policy for each request.
        where: the redacted URL, for messages.
    """

    def __init__(self, fs: Any, path: str, *, part_size: int, concurrency: int, retry: Retry, where: str) -> None:
        super().__init__(part_size=part_size, concurrency=concurrency, retry=retry, where=where)
        self._fs = fs
        self._path = path
        # Part names unique to this writer: two saves may write the same object at once (a replay-buffer chunk
        # is named by its content), and must never compose or delete each other's parts.
        self._prefix = f"{path}.{uuid.uuid4().hex[:12]}"
        self._temporary: list[str] = []  # part and intermediate objects, deleted once composed or aborted
        self._lock = threading.Lock()

    def _next_part_size(self, number: int) -> int:
        if number > _GCS_MAX_COMPONENTS:
            raise StorageError(f"{self._where} needs more than {_GCS_MAX_COMPONENTS} parts; pass a larger part_size")
        return self._part_size << ((number - 1) // _GCS_PARTS_PER_SIZE)

    def _put_whole(self, body: bytearray) -> None:
        self._call("put", lambda: self._fs.pipe_file(self._path, body))

    def _upload_part(self, number: int, body: bytearray) -> str:
        name = f"{self._prefix}.part{number:05d}"
        self._call(f"part {number}", lambda: self._fs.pipe_file(name, body))  # the bytearray as is: no copy
        with self._lock:  # a part whose upload failed may exist anyway: gc removes it
            self._temporary.append(name)
        return name

    def _complete(self, parts: list[str]) -> None:
        level = 0
        while len(parts) > GCS_COMPOSE_LIMIT:  # a tree: compose groups of 32 into intermediate objects
            level += 1
            groups = [parts[i : i + GCS_COMPOSE_LIMIT] for i in range(0, len(parts), GCS_COMPOSE_LIMIT)]
            parts = [f"{self._prefix}.compose{level}-{i:03d}" for i in range(len(groups))]
            with self._lock:
                self._temporary += parts
            for target, group in zip(parts, groups, strict=True):
                self._compose(target, group)
        self._compose(self._path, parts)
        try:
            self._delete_temporary()
        except Exception as exc:  # the object is published: leftovers are gc's to remove
            logger.warning("could not delete the part objects of %s (gc removes them): %.300s", self._where, exc)

    def _compose(self, target: str, sources: list[str]) -> None:
        self._call(f"compose of {len(sources)} parts", lambda: self._fs.merge(target, sources))

    def _discard(self) -> None:
        self._delete_temporary()

    def _delete_temporary(self) -> None:
        with self._lock:
            doomed, self._temporary = self._temporary, []
        if doomed:
            with contextlib.suppress(FileNotFoundError):  # a retry after a lost response to a delete that went through
                self._call(f"delete {len(doomed)} part objects", lambda: self._fs.rm(doomed))
        self._fs.invalidate_cache(self._path)
