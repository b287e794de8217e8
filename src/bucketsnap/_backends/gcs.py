"""Google Cloud Storage (gcsfs): exclusive creates as ``ifGenerationMatch=0``, parallel composite uploads.

A create is exclusive by the precondition ``ifGenerationMatch=0`` (gcsfs sends it for
``pipe_file(mode="create")``), probed before a process first relies on it like S3's. A streamed write is a
parallel composite upload (:class:`GcsComposeWriter`) unless ``upload_concurrency`` is 1, then gcsfs's own
resumable upload behind a thread. Retries read gcsfs's ``HttpError`` codes.

Without a ``token`` option gcsfs looks for credentials itself and, finding none, asks the GCE metadata server
for 15 s before it falls back to anonymous requests. google-auth has already answered whether this machine is
on GCE by then, so :meth:`GcsBackend.prepare_options` asks google-auth once per process and, where it found
no credentials (and gcsfs has no cached token), passes ``token="anon"`` at once: the same requests, 15 s
sooner, and a refused one then says that no credentials were found.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import uuid
from typing import Any, ClassVar

from bucketsnap._backends.base import Backend, PartWriter, Problem, ProblemKind
from bucketsnap._transport import Retry, chain, check_length, is_server_error, read_body_into
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

#: What :meth:`GcsBackend.read_into` uses of a gcsfs filesystem (else it reads through gcsfs's cat_file).
_GCSFS_REQUEST = ("_set_session", "_get_headers", "_get_params", "url", "loop", "requests_timeout")
#: Seconds a request may receive nothing before it fails (and is retried): gcsfs's own requests have no timeout
#: unless ``requests_timeout`` is given, so a response that stalled hung forever. Ranged reads into a buffer
#: always have it; gcsfs's other requests (listings, metadata, uploads) where ``requests_timeout`` is not given.
_READ_STALL = 60.0

_lookup_lock = threading.Lock()
#: Why this process found no Google credentials (None: not looked up yet, "": found some, or left to gcsfs).
_no_credentials: str | None = None
#: google-auth's exceptions that mean the credentials it has were refused when it used them.
_REFUSED_AUTH = {"RefreshError", "InvalidGrant", "ReauthFailError", "UserAccessTokenError"}


def _missing_credentials(options: dict[str, Any]) -> str:
    """Why no Google credentials are to be found, or "" where there are some (or gcsfs may find some)."""
    global _no_credentials
    with _lookup_lock:
        if _no_credentials is None:
            _no_credentials = _look_up_credentials(options.get("access", "full_control"))
        return _no_credentials


def _look_up_credentials(access: str) -> str:
    import google.auth
    import google.auth.exceptions
    from gcsfs.credentials import GoogleCredentials

    try:  # the environment's file, gcloud's application default credentials, then the GCE metadata server
        google.auth.default(scopes=[f"https://www.googleapis.com/auth/devstorage.{access}"])
    except google.auth.exceptions.DefaultCredentialsError as exc:
        GoogleCredentials.load_tokens()
        if GoogleCredentials.tokens:  # gcsfs's own cache of browser logins: let it use them
            return ""
        variable = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
        if variable:
            return f"GOOGLE_APPLICATION_CREDENTIALS={variable} cannot be used: {str(exc).splitlines()[0]}"
        return "no Google credentials were found (GOOGLE_APPLICATION_CREDENTIALS, gcloud login, GCE metadata)"
    except Exception:  # a metadata server that failed to answer, say: gcsfs's own lookup decides
        return ""
    return ""


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

    def read_into(self, path: str, start: int, buffer: memoryview) -> int:
        # gcsfs's own GET (its _request) joins the body into one bytes; this sends the same request, its headers
        # (credentials) made by gcsfs, and copies the body's pieces in as they arrive.
        fs = self.fs
        size = buffer.nbytes
        if not size or not all(hasattr(fs, name) for name in _GCSFS_REQUEST):
            return super().read_into(path, start, buffer)
        import aiohttp
        from fsspec.asyn import sync
        from gcsfs.retry import validate_response

        url = fs.url(path)

        async def get() -> int:
            await fs._set_session()
            headers = fs._get_headers({"Range": f"bytes={start}-{start + size - 1}"})
            params = fs._get_params({})  # userProject, for a requester-pays bucket
            configured = fs.requests_timeout  # seconds in all, or an aiohttp.ClientTimeout
            total = configured.total if isinstance(configured, aiohttp.ClientTimeout) else configured
            timeout = aiohttp.ClientTimeout(total=total, sock_read=_READ_STALL)
            async with fs.session.get(url, headers=headers, params=params, timeout=timeout) as answer:
                if answer.status == 416:  # no byte of the range exists: as a local file reads it
                    return 0
                if answer.status >= 300:  # gcsfs's errors: FileNotFoundError for a 404, HttpError with its code
                    validate_response(answer.status, await answer.read(), path)
                    raise OSError(f"GCS answered a ranged read with HTTP {answer.status}")
                return check_length(await read_body_into(answer.content, buffer), answer.headers.get("Content-Range"))

        return int(sync(fs.loop, get))

    def read(self, path: str, start: int | None = None, end: int | None = None) -> bytes:
        try:
            return super().read(path, start, end)
        except Exception as exc:  # gcsfs's HttpError, which is not an OSError
            if type(exc).__name__ == "HttpError" and getattr(exc, "code", None) == 416:  # no byte of the range exists
                return b""
            raise

    @classmethod
    def prepare_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        import fsspec.config

        configured = {**fsspec.config.conf.get("gcs", {}), **fsspec.config.conf.get("gs", {}), **options}
        prepared = options
        if configured.get("token") is None and _missing_credentials(configured) != "":
            prepared = {**prepared, "token": "anon"}  # what gcsfs would fall back to after 15 s of metadata requests
        if configured.get("requests_timeout") is None:  # gcsfs's default is none: a stalled listing hung forever
            import aiohttp

            prepared = {**prepared, "requests_timeout": aiohttp.ClientTimeout(sock_read=_READ_STALL)}
        return prepared

    def address(self) -> str:
        return str(getattr(self.fs, "_location", "") or self.endpoint or "https://storage.googleapis.com")

    def bucket(self, path: str) -> str:
        return str(self.fs.split_path(path)[0])

    def reach(self, path: str, *, timeout: float) -> Problem | None:
        if not hasattr(self.fs, "call"):
            return None
        bucket, key, _ = self.fs.split_path(path)
        if not bucket:
            return None
        if self._anonymous() and (_no_credentials or "").startswith("GOOGLE_APPLICATION_CREDENTIALS"):
            return Problem("credentials", _no_credentials or "")  # credentials were meant, and cannot be used
        try:  # the listing every run needs anyway (storage.objects.list), of one object at most
            prefix = key.rstrip("/") + "/" if key else ""
            self.fs.call("GET", "b/{}/o", bucket, prefix=prefix, maxResults=1, json_out=True, timeout=timeout)
        except FileNotFoundError:  # listing the objects of a bucket that does not exist
            return Problem("bucket", "404 Not Found")
        return None

    def caveat(self) -> str:
        return f"; besides, {_no_credentials}" if self._anonymous() and _no_credentials else ""

    def _anonymous(self) -> bool:
        return getattr(getattr(self.fs, "credentials", None), "method", None) == "anon"

    def problem(self, exc: BaseException) -> Problem | None:
        for current in chain(exc):
            name = type(current).__name__
            code = getattr(current, "code", None)
            forbidden = code == 403 or (type(current) is OSError and str(current).startswith("Forbidden"))
            if (code == 401 or forbidden) and self._anonymous():
                why = _no_credentials or "the requests are anonymous (token=anon)"
                return Problem("credentials", f"{why}; the server answered {code or 403}")
            if code == 401 or name in _REFUSED_AUTH:
                return Problem("rejected", f"{name}: {str(current).splitlines()[0][:200]}")
            if forbidden:
                return Problem("denied", str(current).splitlines()[-1][:200] or "403 Forbidden")
            if name == "DefaultCredentialsError":
                return Problem("credentials", str(current).splitlines()[0][:200])
        return None

    @classmethod
    def advice(cls, kind: ProblemKind) -> str:
        return {
            "credentials": "Set GOOGLE_APPLICATION_CREDENTIALS to a service account key file, run gcloud auth "
            "application-default login, or pass the storage option token (token=anon reads a public bucket).",
            "rejected": "Check GOOGLE_APPLICATION_CREDENTIALS or the token storage option: the credentials are "
            "invalid, revoked or expired.",
            "bucket": "Check the bucket name in the URL (and --endpoint-url), or create the bucket.",
            "denied": "Check the bucket's IAM roles for these credentials: bucketsnap lists, reads, writes and "
            "deletes under the run (roles/storage.objectAdmin).",
        }[kind]

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
