"""bucketsnap's exceptions, and the redaction of URLs that appear in their messages.

Every exception derives from :class:`BucketsnapError`; where a built-in exception means the same thing, the
subclass inherits it too, so ``except FileNotFoundError`` written for a plain ``torch.load`` keeps working::

    BucketsnapError
    ├── SnapshotNotFoundError   (FileNotFoundError)   empty store, unknown itr, object missing
    ├── NotASnapshotError       (NotAFileError alias)  the location holds something that is not a bucketsnap run
    ├── CorruptSnapshotError    (ValueError)           checksum mismatch, truncated or malformed archive/manifest
    ├── CommitConflictError     (FileExistsError)      a commit could not be made against concurrent writers
    │   └── SnapshotExistsError                        the itr is already committed and overwrite=False
    ├── UnsafeLoadError         (PermissionError)      a pickled value met without allow_pickle=True
    ├── StorageError            (OSError)              the backend failed (network, permissions, throttling)
    │   ├── UnreachableError                           the store did not answer its first request
    │   ├── CredentialsError                           no credentials were found, or the store refused them
    │   └── BucketNotFoundError                        the bucket or container the URL names does not exist
    └── DistributedSaveError                           a rank of a collective save failed or vanished
                                                       (defined in bucketsnap.distributed)

Messages say what happened, name the URL with credentials redacted, and say what to do next.
"""

from __future__ import annotations

import re

__all__ = [
    "BucketNotFoundError",
    "BucketsnapError",
    "CommitConflictError",
    "CorruptSnapshotError",
    "CredentialsError",
    "NotAFileError",
    "NotASnapshotError",
    "SnapshotExistsError",
    "SnapshotNotFoundError",
    "StorageError",
    "UnreachableError",
    "UnsafeLoadError",
]


class BucketsnapError(Exception):
    """Base class of every error bucketsnap raises."""


class SnapshotNotFoundError(BucketsnapError, FileNotFoundError):
    """No committed snapshot matches the request (empty store, unknown itr, or its object is gone)."""


class NotASnapshotError(BucketsnapError):
    """The location exists but holds something that is not a bucketsnap run or snapshot."""


#: garage's name for :class:`NotASnapshotError`.
NotAFileError = NotASnapshotError


class CorruptSnapshotError(BucketsnapError, ValueError):
    """A snapshot archive or manifest failed validation (checksum, truncation, malformed structure)."""


class CommitConflictError(BucketsnapError, FileExistsError):
    """A commit could not be made because of concurrent writers."""


class SnapshotExistsError(CommitConflictError):
    """The itr is already committed; pass ``overwrite=True`` to replace it."""


class UnsafeLoadError(BucketsnapError, PermissionError):
    """A value can only be restored by unpickling, which needs ``allow_pickle=True``."""


class StorageError(BucketsnapError, OSError):
    """The storage backend failed; the message names the URL and the backend's own error."""


class UnreachableError(StorageError):
    """The store did not answer: a refused connection, a host name that does not resolve, no answer in time.

    Raised by a process's first request to a store (per endpoint and bucket), within
    :attr:`Retry.connect_timeout <bucketsnap.Retry.connect_timeout>`.
    """


class CredentialsError(StorageError):
    """No credentials for the store were found, or the store refused them (at the first request)."""


class BucketNotFoundError(StorageError):
    """The bucket (or container) the URL names does not exist (at the first request)."""


#: User info after a scheme and its slashes (two, or one or none in a mistyped URL): up to an ``@`` with no ``/``
#: before it, or, for ``key:secret@`` (AWS secret keys may hold ``/``), up to the first ``@`` after the colon.
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][\w+.-]*:/{0,2})(?:[^/@\s]*|[^/@\s:]*:[^@\s]*)@")
_SECRET_QUERY = re.compile(
    r"(?i)(?P<key>[?&][^=&\s]*(?:sig|signature|token|secret|password|credential|key)[^=&\s]*=)[^&\s]*"
)


#: Pieces of user info seen in URLs (see :func:`remember_secrets`), hidden wherever they appear in a message.
_SEEN_SECRETS: set[str] = set()


def remember_secrets(url: str) -> None:
    """Hide the user info of ``url`` from every later :func:`redact`, wherever it appears in a message: a client
    may repeat part of it on its own (s3fs takes ``key:sec`` of ``s3://key:sec/ret@bucket`` for a bucket name)."""
    match = _USERINFO.search(url)
    if match:
        userinfo = match.group(0)[len(match.group("scheme")) : -1]
        _SEEN_SECRETS.update(piece for piece in re.split(r"[:/]", userinfo) if len(piece) >= 6)


def redact(url: str) -> str:
    """Return ``url`` with user info and secret-looking query values replaced by ``***``.

    >>> redact("s3://AKIA:s3cr3t@bucket/run?X-Amz-Signature=abc&x=1")
    's3://***@bucket/run?X-Amz-Signature=***&x=1'
    >>> redact("s3:/AKIA:s3/cr3t@bucket/run@v2")
    's3:/***@bucket/run@v2'
    """
    url = _USERINFO.sub(r"\g<scheme>***@", url)
    for secret in tuple(_SEEN_SECRETS):  # a copy: another thread may be opening a store meanwhile
        url = url.replace(secret, "***")
    return _SECRET_QUERY.sub(r"\g<key>***", url)
