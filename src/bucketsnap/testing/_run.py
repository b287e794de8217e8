"""``Run``: where one test's training writes its snapshots, as the fixtures hand it out."""

from __future__ import annotations

import posixpath
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from bucketsnap._store import SnapshotStore

__all__ = ["Run", "fresh_name"]


def fresh_name(name: str = "run") -> str:
    """``name`` with a random suffix: a run URL no test used before."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class Run:
    """A fresh, empty run URL and what a client needs to reach it.

    Attributes:
        backend: ``"memory"``, ``"local"``, ``"s3"``, ``"gcs"`` or ``"azure"``.
        url: the run's URL (a path for local disk); nothing is stored under it yet.
        storage_options: pass them as ``SnapshotStore(url, storage_options=...)`` (empty for memory and disk).
        env: environment variables that point an unconfigured client at the server (``AWS_ENDPOINT_URL_S3``
            and test credentials, ``STORAGE_EMULATOR_HOST``, ``AZURE_STORAGE_CONNECTION_STRING``): the
            preemption helper sets them for the training process, so a script that takes only a URL works.
    """

    backend: str
    url: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    def store(self, **kwargs: Any) -> SnapshotStore:
        """A :class:`~bucketsnap.SnapshotStore` of this run; ``kwargs`` go to it."""
        return SnapshotStore(self.url, storage_options=dict(self.storage_options) or None, **kwargs)

    def sibling(self, name: str = "run") -> Run:
        """Another fresh, empty run beside this one, on the same server (for a reference run to compare with)."""
        return replace(self, url=posixpath.join(posixpath.dirname(self.url), fresh_name(name)))
