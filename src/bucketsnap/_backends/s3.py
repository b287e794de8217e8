"""S3 and S3-compatible servers (s3fs): exclusive creates as ``If-None-Match: *``, concurrent multipart uploads.

A create is exclusive by the condition ``If-None-Match: *`` (s3fs sends it for ``pipe_file(mode="create")``);
some S3-compatible servers ignore it, so :class:`~bucketsnap._storage.Storage` probes it before a process first
relies on it (:attr:`~bucketsnap._backends.base.Backend.create_condition`). A streamed write is a multipart
upload with ``upload_concurrency`` parts in flight (:class:`S3MultipartWriter`), which appears when
``complete_multipart_upload`` succeeds; an aborted one leaves nothing. Retries read botocore's error codes, and
so do the problems a store can have: no credentials (``NoCredentialsError``), refused ones
(``InvalidAccessKeyId``, ``SignatureDoesNotMatch``...), no such bucket, access denied.
"""

from __future__ import annotations

import errno
import hashlib
import logging
from typing import Any, ClassVar

from bucketsnap._backends.base import Backend, PartWriter, Problem, ProblemKind
from bucketsnap._transport import Retry, chain, check_length, copy_into, is_server_error, read_body_into
from bucketsnap._uploads import PartBody, PartUploader
from bucketsnap.errors import StorageError

__all__ = ["S3Backend", "S3MultipartWriter"]

logger = logging.getLogger("bucketsnap")

#: S3 refuses parts smaller than this (except the last one).
S3_MIN_PART_SIZE = 5 * 2**20
_S3_MAX_PARTS = 10_000
#: botocore's error codes for requests worth sending again.
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
#: botocore's connection and read errors.
_TRANSIENT_CLASS_NAMES = {
    "EndpointConnectionError",
    "ConnectionClosedError",
    "ReadTimeoutError",
    "ConnectTimeoutError",
    "ResponseStreamingError",
    "IncompleteReadError",
}

#: botocore's exceptions for credentials it could not find.
_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}
#: Error codes of credentials the server refused.
_REJECTED_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "AuthorizationHeaderMalformed",
    "InvalidClientTokenId",
    "UnrecognizedClientException",
}
_DENIED_CODES = {"AccessDenied", "AllAccessDisabled"}


class S3Backend(Backend):
    """``s3://`` through s3fs, on AWS or any S3-compatible server (``endpoint_url``)."""

    name: ClassVar[str] = "S3"
    atomic_create: ClassVar[bool] = True
    create_condition: ClassVar[str | None] = "If-None-Match: *"

    def open_writer(self, path: str, *, where: str) -> Any:
        if not hasattr(self.fs, "call_s3"):  # an S3 filesystem other than s3fs: its own writer
            return super().open_writer(path, where=where)
        return PartWriter(
            S3MultipartWriter(
                self.fs,
                path,
                part_size=self.part_size,
                concurrency=self.upload_concurrency,
                retry=self.retry,
                where=where,
            )
        )

    def read(self, path: str, start: int | None = None, end: int | None = None) -> bytes:
        try:
            return super().read(path, start, end)
        except OSError as exc:
            if _past_the_end(exc):  # 416: no byte of the range exists, as a local file reads it
                return b""
            raise

    def read_into(self, path: str, start: int, buffer: memoryview) -> int:
        try:
            return self._read_into(path, start, buffer)
        except OSError as exc:
            if _past_the_end(exc):
                return 0
            raise

    def _read_into(self, path: str, start: int, buffer: memoryview) -> int:
        fs = self.fs
        size = buffer.nbytes
        if not size or not hasattr(fs, "_call_s3"):
            return super().read_into(path, start, buffer)
        from fsspec.asyn import sync

        bucket, key, version = fs.split_path(path)
        extra = {"VersionId": version} if version else {}

        async def get() -> int:
            answer = await fs._call_s3(  # s3fs's own call: its retries, and NoSuchKey as FileNotFoundError
                "get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{start + size - 1}", **extra
            )
            body = answer["Body"]
            try:
                content = getattr(getattr(body, "_raw_stream", None), "content", None)  # aiohttp's StreamReader
                if content is None or not hasattr(content, "readchunk"):
                    return check_length(copy_into(buffer, await body.read()), answer.get("ContentRange"))
                return check_length(await read_body_into(content, buffer), answer.get("ContentRange"))
            finally:
                body.close()

        return int(sync(fs.loop, get))

    def address(self) -> str:
        client = getattr(self.fs, "_s3", None)  # the aiobotocore client, once a request made it
        return self.endpoint or str(
            getattr(getattr(client, "meta", None), "endpoint_url", "") or "https://s3.amazonaws.com"
        )

    def bucket(self, path: str) -> str:
        return str(self.fs.split_path(path)[0])

    def reach(self, path: str, *, timeout: float) -> Problem | None:
        if not hasattr(self.fs, "call_s3"):
            return None
        bucket, key, _ = self.fs.split_path(path)
        if not bucket:
            return None
        prefix = key.rstrip("/") + "/" if key else ""
        try:  # the listing every run needs anyway (s3:ListBucket), of one key at most; fsspec's sync cuts it off
            self.fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=1, timeout=timeout)
        except FileNotFoundError as exc:  # s3fs's NoSuchBucket, or a bare 404 from a server that is no S3
            found = self.problem(exc)
            said = "" if str(exc) in ("", "Not Found", path) else f": {exc}"
            return found or Problem("bucket", f"404 Not Found{said}")
        return None

    def problem(self, exc: BaseException) -> Problem | None:
        for current in chain(exc):
            name = type(current).__name__
            if name in _NO_CREDENTIALS:
                return Problem("credentials", f"{name}: {current}")
            response = getattr(current, "response", None)
            if not isinstance(response, dict):
                continue
            code = str((response.get("Error") or {}).get("Code") or "")
            if code in _REJECTED_CODES:
                return Problem("rejected", code)
            if code in _DENIED_CODES:
                return Problem("denied", code)
            if code == "NoSuchBucket":
                return Problem("bucket", code)
        return None

    @classmethod
    def advice(cls, kind: ProblemKind) -> str:
        return {
            "credentials": "Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or pass the storage "
            "options key and secret; anon=true reads a public bucket.",
            "rejected": "Check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or the key and secret "
            "storage options), and that they are this endpoint's.",
            "bucket": "Check the bucket name in the URL and the endpoint (--endpoint-url, the region), or create "
            "the bucket.",
            "denied": "Check the bucket policy and the credentials' permissions: bucketsnap lists, reads, writes "
            "and deletes under the run.",
        }[kind]

    @classmethod
    def vendor_transient(cls, exc: BaseException) -> bool:
        if any(c.__name__ in _TRANSIENT_CLASS_NAMES for c in type(exc).__mro__):
            return True
        response = getattr(exc, "response", None)  # botocore's ClientError
        if isinstance(response, dict):
            code = (response.get("Error") or {}).get("Code")
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            return code in _TRANSIENT_CODES or is_server_error(status)
        return False

    @classmethod
    def vendor_throttled(cls, exc: BaseException) -> bool:
        response = getattr(exc, "response", None)
        return isinstance(response, dict) and (response.get("ResponseMetadata") or {}).get("HTTPStatusCode") == 429


def _error_code(exc: BaseException) -> str | None:
    """botocore's error code of ``exc`` or of the error it was translated from (s3fs raises its own)."""
    for error in chain(exc):
        response = getattr(error, "response", None)
        if isinstance(response, dict):
            return str((response.get("Error") or {}).get("Code") or "") or None
    return None


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
        super().__init__(
            part_size=max(part_size, S3_MIN_PART_SIZE),
            concurrency=concurrency,
            retry=retry,
            where=where,
            retryable=S3Backend.is_transient,
        )
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
        self._call(
            "put", lambda: self._fs.call_s3("put_object", Bucket=self._bucket, Key=self._key, Body=PartBody(body))
        )

    def _upload_part(self, number: int, body: bytearray) -> dict[str, Any]:
        out = self._call(
            f"part {number}",
            lambda: self._fs.call_s3(
                "upload_part",
                Bucket=self._bucket,
                Key=self._key,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=PartBody(body),  # read in chunks: the client holds no copy of the part (see PartBody)
            ),
        )
        part = {"PartNumber": number, "ETag": out["ETag"]}
        if "ChecksumSHA256" in out:
            part["ChecksumSHA256"] = out["ChecksumSHA256"]
        return part

    def _complete(self, parts: list[dict[str, Any]]) -> None:
        attempts = 0

        def complete() -> Any:
            nonlocal attempts
            attempts += 1
            try:
                return self._fs.call_s3(
                    "complete_multipart_upload",
                    Bucket=self._bucket,
                    Key=self._key,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": parts},
                )
            except Exception as exc:
                # A retry after a response that was lost: the upload is gone because the first try completed it
                # (the key is this writer's own). Its multipart ETag, a hash of the parts' ETags, says so for sure.
                if _error_code(exc) != "NoSuchUpload":
                    raise
                if attempts > 1 and self._completed_with(parts):
                    logger.info("%s: the upload was completed by an earlier try whose response was lost", self._where)
                    return None
                raise StorageError(
                    f"upload of {self._where}: the multipart upload is gone before it was completed (aborted by "
                    "a bucket lifecycle rule or another client?). Nothing was committed; committed snapshots "
                    "are intact. Save again."
                ) from exc

        self._call("complete", complete)

    def _completed_with(self, parts: list[dict[str, Any]]) -> bool:
        """Whether the key holds the object these parts make (S3's multipart ETag: the MD5 of the parts' MD5s,
        ``-`` and their count); False when a part's ETag is not an MD5 (encrypted with KMS, some servers)."""
        try:
            digests = b"".join(bytes.fromhex(str(p["ETag"]).strip('"')) for p in parts)
        except ValueError:
            return False
        if len(digests) != 16 * len(parts):
            return False
        expected = f'"{hashlib.md5(digests, usedforsecurity=False).hexdigest()}-{len(parts)}"'
        try:
            head = self._fs.call_s3("head_object", Bucket=self._bucket, Key=self._key)
        except Exception:
            return False
        return str(head.get("ETag")) == expected

    def _discard(self) -> None:
        # an unaborted upload is invisible; a bucket lifecycle rule (AbortIncompleteMultipartUpload) removes it
        self._call(
            "abort",
            lambda: self._fs.call_s3(
                "abort_multipart_upload", Bucket=self._bucket, Key=self._key, UploadId=self._upload_id
            ),
        )


def _past_the_end(exc: OSError) -> bool:
    """Whether S3 refused a ranged read as starting at or past the object's end (416, ``InvalidRange``), which
    s3fs raises as ``OSError(EINVAL)``."""
    error = getattr(exc.__cause__, "response", None) or {}
    code = str(error.get("Error", {}).get("Code", "")) if isinstance(error, dict) else ""
    status = error.get("ResponseMetadata", {}).get("HTTPStatusCode") if isinstance(error, dict) else None
    return exc.errno == errno.EINVAL and (
        code == "InvalidRange" or status == 416 or "range is not satisfiable" in str(exc)
    )
