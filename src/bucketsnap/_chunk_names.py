"""The names of replay-buffer chunk objects, and what a name records: apart from :mod:`bucketsnap._chunks`, so
that listing, verifying, copying and gc, which meet chunks only by name, never import numpy.

A chunk object is ``chunks/<hash of the raw bytes>-<CRC-32 of the object>-<save token>.zst`` (or
``chunks/<sha256>.zst``, written before names carried a CRC), or ``...-<save token>.shift.zst`` for a chunk
whose repeated rows are stored once: see :mod:`bucketsnap._chunks` and :mod:`bucketsnap._row_shifts`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["CHUNK_DIR", "CHUNK_OBJECT", "chunk_object", "is_shifted", "named_checksum", "object_crc"]

CHUNK_DIR = "chunks"
#: A chunk object's path: group 1 its id, group 2 the CRC-32 of its stored bytes (absent in old names).
#: Group 3 is ``.shift`` for an object whose rows repeating another field's next row are stored once (see
#: :mod:`bucketsnap._row_shifts`).
CHUNK_OBJECT = re.compile(rf"{CHUNK_DIR}/([0-9a-f]{{64}})(?:-([0-9a-f]{{8}})-[0-9a-f]{{8,32}}(\.shift)?)?\.zst")


def chunk_object(chunk: Mapping[str, Any]) -> str:
    """The object path, relative to the run, of a chunk table entry (``chunks/<id>.zst`` for old runs)."""
    return str(chunk.get("path") or f"{CHUNK_DIR}/{chunk['id']}.zst")


def object_crc(rel: str) -> int | None:
    """The CRC-32 of the stored bytes that the chunk object's name records, or None (an old chunk name)."""
    match = CHUNK_OBJECT.fullmatch(rel)
    return int(match.group(2), 16) if match and match.group(2) else None


def named_checksum(rel: str) -> str | None:
    """``"crc32:<8 hex>"`` of chunk object ``rel`` as its name records it (None: not a chunk, or an old name)."""
    crc = object_crc(rel)
    return None if crc is None else f"crc32:{crc:08x}"


def is_shifted(rel: str) -> bool:
    """Whether chunk object ``rel`` stores rows repeating another field's next row once (``.shift.zst``)."""
    match = CHUNK_OBJECT.fullmatch(rel)
    return bool(match and match.group(3))
