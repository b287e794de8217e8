"""Storage backends: one module per kind of store behind one contract (:class:`~.base.Backend`), found by protocol.

========  ======================================  =========================================================
protocol  module                                  how a commit is atomic
========  ======================================  =========================================================
file      :mod:`bucketsnap._backends.local`       hard link of a fsynced temp file; rename for archives
memory    :mod:`bucketsnap._backends.memory`      a lock around check-then-write
s3        :mod:`bucketsnap._backends.s3`          ``If-None-Match: *``, probed; multipart uploads
gs        :mod:`bucketsnap._backends.gcs`         ``ifGenerationMatch=0``, probed; composite uploads
az/abfs   :mod:`bucketsnap._backends.azure`       ``If-None-Match: *``, probed; block uploads
other     :mod:`bucketsnap._backends.base`        none: fsspec's check-then-write, with a warning
========  ======================================  =========================================================

A new backend is a module with a :class:`~.base.Backend` subclass and one line in :data:`_BUILT_IN` (or a call to
:func:`register` from outside the package). It must pass ``tests/test_storage_contract.py``.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable

import fsspec

from bucketsnap._backends.base import Backend, ObjectWriter, Problem
from bucketsnap._transport import is_throttled as _is_throttled
from bucketsnap._transport import is_transient as _is_transient

__all__ = [
    "Backend",
    "ObjectWriter",
    "Problem",
    "backend_class",
    "backend_for",
    "is_throttled",
    "is_transient",
    "known_protocols",
    "register",
]

#: Built-in backends: protocol -> "module:class", imported on first use (so s3fs, gcsfs, adlfs load only when used).
_BUILT_IN = {
    "file": "local:LocalBackend",
    "local": "local:LocalBackend",
    "memory": "memory:MemoryBackend",
    "s3": "s3:S3Backend",
    "s3a": "s3:S3Backend",
    "gs": "gcs:GcsBackend",
    "gcs": "gcs:GcsBackend",
    "az": "azure:AzureBackend",
    "abfs": "azure:AzureBackend",
    "abfss": "azure:AzureBackend",
}
_registered: dict[str, type[Backend]] = {}


def register(protocols: str | Iterable[str], backend: type[Backend]) -> None:
    """Use ``backend`` for filesystems of ``protocols`` (replacing a built-in one)."""
    for protocol in [protocols] if isinstance(protocols, str) else protocols:
        _registered[protocol] = backend


def backend_class(fs: fsspec.AbstractFileSystem) -> type[Backend]:
    """The backend for ``fs``: the first of its protocols with one, then those of the classes it derives from
    (a filesystem wrapping fsspec's memory one is the memory backend), else the generic fsspec backend."""
    for klass in type(fs).__mro__:
        protocols = getattr(fs if klass is type(fs) else klass, "protocol", None)
        if isinstance(protocols, str):
            protocols = [protocols]
        for protocol in protocols if isinstance(protocols, (tuple, list)) else ():
            if protocol in _registered or protocol in _BUILT_IN:
                return backend_for(protocol)
    return Backend


def backend_for(protocol: str) -> type[Backend]:
    """The backend for filesystems of ``protocol``, before one is made (the generic one if none is known)."""
    if protocol in _registered:
        return _registered[protocol]
    if protocol in _BUILT_IN:
        module, name = _BUILT_IN[protocol].split(":")
        cls: type[Backend] = getattr(importlib.import_module(f"{__name__}.{module}"), name)
        return cls
    return Backend


def known_protocols() -> list[str]:
    """The protocols with a backend of their own, built in first."""
    return [*_BUILT_IN, *(p for p in _registered if p not in _BUILT_IN)]


def _known() -> list[type[Backend]]:
    names = sorted(set(_BUILT_IN.values()))
    found = [getattr(importlib.import_module(f"{__name__}.{m}"), n) for m, n in (x.split(":") for x in names)]
    return [*found, *_registered.values()]


def is_transient(exc: BaseException) -> bool:
    """Whether any backend would retry ``exc`` (for code that does not know which store raised it)."""
    return _is_transient(exc, lambda e: any(b.vendor_transient(e) for b in _known()))


def is_throttled(exc: BaseException) -> bool:
    """Whether any backend reads ``exc`` as throttling."""
    return _is_throttled(exc, lambda e: any(b.vendor_throttled(e) for b in _known()))
