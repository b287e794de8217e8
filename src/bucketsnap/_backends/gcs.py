"""Google Cloud Storage (gcsfs): exclusive creates as ``ifGenerationMatch=0``, parallel composite uploads.

A create is exclusive by the precondition ``ifGenerationMatch=0`` (gcsfs sends it for
``pipe_file(mode="create")``), probed before a process first relies on it like S3's. A streamed write is a
parallel composite upload (:class:`GcsComposeWriter`) unless ``upload_concurrency`` is 1, then gcsfs's own
resumable upload behind a thread. Retries read gcsfs's ``HttpError`` codes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from typing import Any, ClassVar

from bucketsnap._backends.base import Backend, PartWriter
from bucketsnap._transport import Retry, is_server_error
from bucketsnap._uploads import PartUploader
from bucketsnap.errors import StorageError

__all__ = ["GCS_COMPOSE_LIMIT", "GcsBackend", "GcsComposeWriter"]

logger = logging.getLogger("bucketsnap")

#: Source objects one GCS ``compose`` request accepts.
GCS_COMPOSE_LIMIT = 32
#: Components a GCS composite object may have.
_GCS_MAX_COMPONENTS = 1024
#: GCS parts double in size every this many parts, so that 1024 parts of 16 MiB and up cover 60 GiB.
_GCS_PARTS_PER_SIZE = 256


class GcsBackend(Backend):
    """``gs://`` through gcsfs, on GCS or fake-gcs-server (``endpoint_url``)."""

    name: ClassVar[str] = "GCS"
    atomic_create: ClassVar[bool] = True
    create_condition: ClassVar[str | None] = "ifGenerationMatch=0"

    def open_writer(self, path: str, *, where: str) -> Any:
        if not hasattr(self.fs, "merge") or self.upload_concurrency == 1:
            return super().open_writer(path, where=where)  # gcsfs's resumable upload
        return PartWriter(
            GcsComposeWriter(
                self.fs,
                path,
                part_size=self.part_size,
                concurrency=self.upload_concurrency,
                retry=self.retry,
                where=where,
            )
        )

    @classmethod
    def vendor_transient(cls, exc: BaseException) -> bool:
        return is_server_error(getattr(exc, "code", None))  # gcsfs's HttpError

    @classmethod
    def vendor_throttled(cls, exc: BaseException) -> bool:
        return getattr(exc, "code", None) == 429


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
        super().__init__(
            part_size=part_size, concurrency=concurrency, retry=retry, where=where, retryable=GcsBackend.is_transient
        )
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
