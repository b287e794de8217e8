"""Azure Blob Storage (adlfs): exclusive creates as ``If-None-Match: *``, concurrent block uploads."""

from __future__ import annotations

from typing import ClassVar

from bucketsnap._backends.base import Backend

__all__ = ["AzureBackend"]


class AzureBackend(Backend):
    """``az://`` and ``abfs://`` through adlfs, on Azure or Azurite."""

    name: ClassVar[str] = "Azure"
    atomic_create: ClassVar[bool] = True
    create_condition: ClassVar[str | None] = "If-None-Match: *"
