"""bucketsnap: training-state snapshots in zstd zip archives at any fsspec URL, with an atomic commit log.

The API is this package's root and the documented modules :mod:`bucketsnap.buffers`, :mod:`bucketsnap.retention`,
:mod:`bucketsnap.distributed`, :mod:`bucketsnap.persistence`, :mod:`bucketsnap.errors` and
:mod:`bucketsnap.integrations`; every module whose name starts with ``_`` is internal (docs/architecture.md says
which does what). The modules that were public before 0.2 (``bucketsnap.store``, ``bucketsnap.values``, ...)
still import, with a ``DeprecationWarning``.
"""

import importlib as _importlib
import importlib.abc as _importlib_abc
import importlib.util as _importlib_util
import sys as _sys
import warnings as _warnings
from types import ModuleType as _ModuleType
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

from bucketsnap._info import MemberInfo, SnapshotInfo
from bucketsnap._transport import Retry
from bucketsnap._version import __version__
from bucketsnap.errors import (
    BucketNotFoundError,
    BucketsnapError,
    CommitConflictError,
    CorruptSnapshotError,
    CredentialsError,
    NotAFileError,
    NotASnapshotError,
    SnapshotExistsError,
    SnapshotNotFoundError,
    StorageError,
    UnreachableError,
    UnsafeLoadError,
)
from bucketsnap.retention import KeepAny, KeepBest, KeepEvery, KeepLast, RetentionPolicy

if _TYPE_CHECKING:
    from bucketsnap._background import SaveFuture
    from bucketsnap._preemption import PreemptionHandler, on_preemption
    from bucketsnap._progress import progress_bar
    from bucketsnap._resume import Resumed, resume
    from bucketsnap._saving import ExternalValue
    from bucketsnap._snapshot import Snapshot
    from bucketsnap._snapshotter import Snapshotter
    from bucketsnap._store import SnapshotStore
    from bucketsnap._triggers import IntervalTrigger, PolicySaveTrigger
    from bucketsnap.distributed import DistributedSaveError, Sharded

#: Names imported on first use, and their modules: these import torch (and fsspec), which ``import bucketsnap``
#: and the command line's ``--help``, ``ls``, ``gc`` and ``cp`` never need.
_LAZY = {
    "DistributedSaveError": "bucketsnap.distributed",
    "ExternalValue": "bucketsnap._saving",
    "IntervalTrigger": "bucketsnap._triggers",
    "PolicySaveTrigger": "bucketsnap._triggers",
    "PreemptionHandler": "bucketsnap._preemption",
    "Resumed": "bucketsnap._resume",
    "SaveFuture": "bucketsnap._background",
    "Sharded": "bucketsnap.distributed",
    "Snapshot": "bucketsnap._snapshot",
    "SnapshotStore": "bucketsnap._store",
    "Snapshotter": "bucketsnap._snapshotter",
    "on_preemption": "bucketsnap._preemption",
    "progress_bar": "bucketsnap._progress",
    "resume": "bucketsnap._resume",
}


def __getattr__(name: str) -> _Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bucketsnap' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "BucketNotFoundError",
    "BucketsnapError",
    "CommitConflictError",
    "CorruptSnapshotError",
    "CredentialsError",
    "DistributedSaveError",
    "ExternalValue",
    "IntervalTrigger",
    "KeepAny",
    "KeepBest",
    "KeepEvery",
    "KeepLast",
    "MemberInfo",
    "NotAFileError",
    "NotASnapshotError",
    "PolicySaveTrigger",
    "PreemptionHandler",
    "Resumed",
    "RetentionPolicy",
    "Retry",
    "SaveFuture",
    "Sharded",
    "Snapshot",
    "SnapshotExistsError",
    "SnapshotInfo",
    "SnapshotNotFoundError",
    "SnapshotStore",
    "Snapshotter",
    "StorageError",
    "UnreachableError",
    "UnsafeLoadError",
    "__version__",
    "on_preemption",
    "progress_bar",
    "resume",
]

#: Modules renamed in 0.2, when the internal ones got a leading underscore: old name -> new name.
_RENAMED = {
    f"bucketsnap.{name}": f"bucketsnap._{name}"
    for name in (
        "archive",
        "chunks",
        "cli",
        "cli_output",
        "copying",
        "export",
        "info",
        "maintenance",
        "manifest",
        "preemption",
        "progress",
        "resume",
        "snapshot",
        "snapshotter",
        "storage",
        "store",
        "transport",
        "triggers",
        "uploads",
        "values",
        "zipformat",
    )
}


class _RenamedModules(_importlib_abc.MetaPathFinder, _importlib_abc.Loader):
    """Imports an old module name as its internal module, with a DeprecationWarning."""

    def find_spec(self, fullname: str, path: object, target: object = None) -> _importlib.machinery.ModuleSpec | None:
        if fullname not in _RENAMED:
            return None
        return _importlib_util.spec_from_loader(fullname, self)

    def __init__(self) -> None:
        self._own_specs: dict[str, _importlib.machinery.ModuleSpec | None] = {}

    def create_module(self, spec: _importlib.machinery.ModuleSpec) -> _ModuleType:
        new = _RENAMED[spec.name]
        _warnings.warn(
            f"{spec.name} is internal since bucketsnap 0.2 (now {new}): import what you need from bucketsnap, "
            "or from the documented modules (docs/api.md)",
            DeprecationWarning,
            stacklevel=2,
        )
        module = _importlib.import_module(new)
        self._own_specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module: _ModuleType) -> None:
        # The import system has just set the module's __spec__ to the old name's: give it its own back.
        old = module.__spec__.name if module.__spec__ is not None else ""
        module.__spec__ = self._own_specs.pop(old, module.__spec__)


if not any(isinstance(finder, _RenamedModules) for finder in _sys.meta_path):
    _sys.meta_path.append(_RenamedModules())
