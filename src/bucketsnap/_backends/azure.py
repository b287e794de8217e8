"""Azure Blob Storage (adlfs): exclusive creates as ``If-None-Match: *``, concurrent block uploads.

Reads, creates and uploads call the Azure SDK's async blob client that adlfs holds (``fs.service_client``, run on
adlfs's event loop) with the SDK's own retries off (``retry_total=0``), so that bucketsnap's retry policy is the
only one: with the SDK's defaults a refused connection takes over a minute to fail. Listings, ``info`` and
deletes go through adlfs.

* **Exclusive create:** Put Blob with ``If-None-Match: *`` (``upload_blob(overwrite=False)``); a second create
  of the name is refused with 409 ``BlobAlreadyExists``. Probed before a process first relies on it, like S3's.
* **Streamed writes:** Put Block for each part, ``upload_concurrency`` at a time, then one Put Block List
  (:class:`AzureBlockWriter`). Staged blocks are invisible until the block list is committed; an aborted write
  commits nothing, and Azure drops uncommitted blocks after a week. adlfs's own writer is not used: it commits
  what was written when the ``with`` block raises, and its ``discard()`` does nothing.
* **Errors:** azure-core's ``ServiceRequestError`` / ``ServiceResponseError`` (connection, timeout) and answers
  408, 429, 500, 502, 503 and 504 are transient; 503 ``ServerBusy``, 500 ``OperationTimedOut`` and 429 are
  throttling. ``AuthenticationFailed`` is a refused account key or SAS token, ``NoAuthenticationInformation``
  or an azure-identity credential that found nothing are missing credentials, ``ContainerNotFound`` a
  container that does not exist.
"""

from __future__ import annotations

import posixpath
import urllib.parse
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar, TypeVar

from bucketsnap._backends.base import Backend, PartWriter, Problem, ProblemKind
from bucketsnap._transport import Retry, chain
from bucketsnap._uploads import PartBody, PartUploader
from bucketsnap.errors import StorageError

__all__ = ["AzureBackend", "AzureBlockWriter"]

T = TypeVar("T")

#: Blocks one blob may have committed.
_MAX_BLOCKS = 50_000
_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
_TRANSIENT_CLASS_NAMES = {"ServiceRequestError", "ServiceResponseError", "DecodeError", "IncompleteReadError"}
_THROTTLE_CODES = {"ServerBusy", "OperationTimedOut"}
_REJECTED_CODES = {"AuthenticationFailed", "InvalidAuthenticationInfo"}
_DENIED_CODES = {"AuthorizationFailure", "AuthorizationPermissionMismatch", "AuthorizationResourceTypeMismatch"}
_NO_CREDENTIAL_CLASSES = {"CredentialUnavailableError"}


class AzureBackend(Backend):
    """``az://``, ``abfs://`` and ``abfss://`` through adlfs, on Azure or Azurite."""

    name: ClassVar[str] = "Azure"
    atomic_create: ClassVar[bool] = True
    create_condition: ClassVar[str | None] = "If-None-Match: *"
    bucket_word: ClassVar[str] = "container"

    def address(self) -> str:
        url = str(getattr(getattr(self.fs, "service_client", None), "url", "") or "")
        parts = urllib.parse.urlsplit(url)
        return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")) if url else ""  # no SAS

    def bucket(self, path: str) -> str:
        return str(self.fs.split_path(path)[0])

    def reach(self, path: str, *, timeout: float) -> Problem | None:
        container, blob, _ = self.fs.split_path(path)
        if not container:
            return None
        prefix = blob.rstrip("/") + "/" if blob else ""

        async def run() -> None:  # the listing every run needs anyway, of one blob at most, SDK retries off
            async with self.fs.service_client.get_container_client(container) as client:
                pages = client.list_blobs(name_starts_with=prefix, results_per_page=1, retry_total=0).by_page()
                async for page in pages:
                    async for _ in page:
                        break
                    break

        from fsspec.asyn import sync

        sync(self.fs.loop, run, timeout=timeout)
        return None

    def problem(self, exc: BaseException) -> Problem | None:
        for current in chain(exc):
            name = type(current).__name__
            code = _code(current)
            if code == "AuthorizationFailure" and "failed to authenticate" in str(current):
                code = "AuthenticationFailed"  # Azurite's answer to a wrong account key
            if name in _NO_CREDENTIAL_CLASSES or code == "NoAuthenticationInformation":
                return Problem("credentials", f"{code or name}: {str(current).splitlines()[0][:200]}")
            if "DefaultAzureCredential failed" in str(current):
                return Problem("credentials", str(current).splitlines()[0][:200])
            if code in _REJECTED_CODES:
                return Problem("rejected", code)
            if code in _DENIED_CODES:
                return Problem("denied", code)
            if code == "ContainerNotFound":
                return Problem("bucket", code)
        return None

    @classmethod
    def advice(cls, kind: ProblemKind) -> str:
        return {
            "credentials": "Pass the storage options account_name with account_key or sas_token, or "
            "connection_string (or set AZURE_STORAGE_CONNECTION_STRING).",
            "rejected": "Check account_key, sas_token or connection_string: the key or token is not this "
            "account's, or has expired.",
            "bucket": "Check the container name (az://CONTAINER/path), or create the container: bucketsnap "
            "does not create containers.",
            "denied": "Check the SAS token's permissions or the role assignments: bucketsnap lists, reads, "
            "writes and deletes under the run.",
        }[kind]

    def read(self, path: str, start: int | None = None, end: int | None = None) -> bytes:
        if (start is not None and start < 0) or (end is not None and end < 0):
            size = self.size(path)  # the SDK takes offsets from the start only
            start = None if start is None else max(0, size + start) if start < 0 else start
            end = None if end is None else max(0, size + end) if end < 0 else end
        offset = start or 0
        if end is not None and end <= offset:
            self.size(path)  # still "not found" when missing
            return b""
        length = None if end is None else end - offset

        async def download(client: Any) -> bytes:
            stream = await client.download_blob(offset=offset, length=length, retry_total=0)
            return bytes(await stream.readall())

        try:
            return self._blob(path, download)
        except Exception as exc:
            if _status(exc) == 416:  # a start past the end, as fsspec's other backends answer it
                return b""
            raise

    def info(self, path: str) -> dict[str, Any]:
        # From the blob's own properties: adlfs answers info() from a cached listing of the parent, which
        # invalidate_cache(path) does not drop, so a blob written since would read as missing.
        async def properties(client: Any) -> Any:
            return await client.get_blob_properties(retry_total=0)

        if self.fs.split_path(path)[1]:
            try:
                p = self._blob(path, properties)
            except FileNotFoundError:
                pass  # a directory (a prefix of blob names), or nothing
            else:
                return {
                    "name": path,
                    "size": int(p.size),
                    "type": "file",
                    "last_modified": p.last_modified,
                    "creation_time": p.creation_time,
                }
        self.fs.invalidate_cache(posixpath.dirname(path))
        self.fs.invalidate_cache(path)
        return dict(self.fs.info(path))

    def exists(self, path: str) -> bool:
        try:
            self.info(path)
        except FileNotFoundError:
            return False
        return True

    def is_file(self, path: str) -> bool:
        try:
            return bool(self.info(path)["type"] == "file")
        except FileNotFoundError:
            return False

    def create_exclusive(self, path: str, data: bytes, *, where: str) -> None:
        async def create(client: Any) -> None:
            await client.upload_blob(data, overwrite=False, retry_total=0, max_concurrency=1)

        try:
            self._blob(path, create)
        except Exception as exc:
            if self.is_precondition_failure(exc):
                raise FileExistsError(where) from exc
            raise
        finally:
            self.fs.invalidate_cache(path)

    def open_writer(self, path: str, *, where: str) -> Any:
        writer = AzureBlockWriter(
            self, path, part_size=self.part_size, concurrency=self.upload_concurrency, retry=self.retry, where=where
        )
        return PartWriter(writer)

    def list(self, path: str) -> dict[str, int | None]:
        # Through the SDK with its retries off, as reads are: adlfs lists with the SDK's default retries, which
        # turn an outage into minutes per listing.
        from fsspec.asyn import sync

        container, key, _ = self.fs.split_path(path)
        if not container:
            return super().list(path)
        prefix = key.rstrip("/") + "/" if key else ""

        async def walk() -> dict[str, int | None]:
            out: dict[str, int | None] = {}
            async with self.fs.service_client.get_container_client(container) as client:
                try:
                    async for item in client.walk_blobs(name_starts_with=prefix, delimiter="/", retry_total=0):
                        name = str(item.name)[len(prefix) :].rstrip("/")
                        if name:
                            out[name] = int(item.size) if hasattr(item, "size") else None
                except Exception as exc:
                    if type(exc).__name__ == "ResourceNotFoundError":
                        raise FileNotFoundError(path) from exc
                    raise
            return out

        try:
            result: dict[str, int | None] = sync(self.fs.loop, walk)
        except FileNotFoundError:
            return {}
        return result

    def delete(self, path: str) -> None:
        async def remove(client: Any) -> None:
            await client.delete_blob(retry_total=0)

        try:
            self._blob(path, remove)
        except FileNotFoundError:
            pass
        finally:
            self.fs.invalidate_cache(path)

    def _blob(self, path: str, fn: Callable[[Any], Coroutine[Any, Any, T]]) -> T:
        """Run ``fn`` with the SDK's async client of blob ``path`` on adlfs's event loop."""
        from fsspec.asyn import sync

        container, blob, _ = self.fs.split_path(path)

        async def run() -> T:
            async with self.fs.service_client.get_blob_client(container, blob) as client:
                try:
                    return await fn(client)
                except Exception as exc:
                    if type(exc).__name__ == "ResourceNotFoundError":
                        raise FileNotFoundError(path) from exc
                    raise

        result: T = sync(self.fs.loop, run)
        return result

    @classmethod
    def vendor_transient(cls, exc: BaseException) -> bool:
        if any(c.__name__ in _TRANSIENT_CLASS_NAMES for c in type(exc).__mro__):
            return True
        if not any(c.__name__ == "HttpResponseError" for c in type(exc).__mro__):
            return False
        status = getattr(exc, "status_code", None)
        return status is None or status in _TRANSIENT_STATUS  # None: the answer broke off mid-body

    @classmethod
    def vendor_throttled(cls, exc: BaseException) -> bool:
        if not any(c.__name__ == "HttpResponseError" for c in type(exc).__mro__):
            return False
        return getattr(exc, "status_code", None) == 429 or _code(exc) in _THROTTLE_CODES

    @classmethod
    def is_precondition_failure(cls, exc: BaseException) -> bool:
        return any(
            _code(e) == "BlobAlreadyExists" or type(e).__name__ == "ResourceExistsError" for e in chain(exc)
        ) or super().is_precondition_failure(exc)


class AzureBlockWriter(PartUploader[str]):
    """Streams one blob as blocks staged ``concurrency`` at a time, published by one Put Block List.

    Block IDs are random and all of one length (Azure refuses a block list mixing lengths). Two writers must not
    stream one name at once (a commit drops the other's staged blocks); bucketsnap never does: every object a save
    writes is named with its token.
    """

    def __init__(
        self, backend: AzureBackend, path: str, *, part_size: int, concurrency: int, retry: Retry, where: str
    ) -> None:
        super().__init__(
            part_size=part_size,
            concurrency=concurrency,
            retry=retry,
            where=where,
            retryable=AzureBackend.is_transient,
        )
        self._backend = backend
        self._path = path

    def close(self) -> None:
        super().close()
        self._backend.fs.invalidate_cache(self._path)

    def _next_part_size(self, number: int) -> int:
        if number > _MAX_BLOCKS:
            raise StorageError(
                f"{self._where} needs more than {_MAX_BLOCKS} blocks of {self._part_size} bytes; pass a larger "
                "part_size"
            )
        return self._part_size

    def _put_whole(self, body: bytearray) -> None:
        async def put(client: Any) -> None:
            await client.upload_blob(bytes(body), overwrite=True, retry_total=0, max_concurrency=1)

        self._call("put", lambda: self._backend._blob(self._path, put))

    def _upload_part(self, number: int, body: bytearray) -> str:
        block_id = uuid.uuid4().hex

        async def stage(client: Any) -> None:
            # A file object, read in chunks: a bytes copy of each part cost a pass over the bytes and held the
            # part twice (see bucketsnap._uploads.PartBody).
            await client.stage_block(block_id=block_id, data=PartBody(body), length=len(body), retry_total=0)

        self._call(f"block {number}", lambda: self._backend._blob(self._path, stage))
        return block_id

    def _complete(self, parts: list[str]) -> None:
        from azure.storage.blob import BlobBlock

        async def commit(client: Any) -> None:
            await client.commit_block_list([BlobBlock(block_id=b) for b in parts], retry_total=0)

        self._call("block list", lambda: self._backend._blob(self._path, commit))

    def _discard(self) -> None:
        """Nothing to undo: staged blocks stay invisible, and Azure drops them after a week."""


def _code(exc: BaseException) -> str:
    """The service's error code of an azure-core error ("" if none): the SDK gives an enum member or a string."""
    code = getattr(exc, "error_code", None)
    return str(getattr(code, "value", code) or "")


def _status(exc: BaseException) -> int | None:
    for e in chain(exc):
        status = getattr(e, "status_code", None)
        if isinstance(status, int):
            return status
    return None
