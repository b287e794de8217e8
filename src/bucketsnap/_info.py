"""What the manifest records about each committed snapshot: :class:`SnapshotInfo` and :class:`MemberInfo`."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from bucketsnap.errors import CorruptSnapshotError

__all__ = ["MemberInfo", "SnapshotInfo", "check_metrics", "crc32_checksum"]

Metric = int | float | str | bool | None

_CRC32_CHECKSUM = re.compile(r"crc32:[0-9a-f]{8}")
_CHECKSUM = re.compile(r"[a-z0-9_-]{1,32}:[0-9a-f]{1,128}")


def crc32_checksum(crc: int) -> str:
    """The manifest's form of a whole-object CRC-32: ``"crc32:<8 lowercase hex>"``.

    >>> crc32_checksum(0x1A2B3C)
    'crc32:001a2b3c'
    """
    return f"crc32:{crc & 0xFFFFFFFF:08x}"


@dataclass(frozen=True)
class MemberInfo:
    """One archive member: the value saved under one top-level key.

    Attributes:
        name: the zip member name (``<key>.zst``).
        offset: byte offset of the member's stored data in the archive, so it is read with one ranged request.
        stored_size: bytes stored (the zstd frame).
        raw_size: bytes after decompression.
        crc32: CRC-32 of the stored bytes, as 8 hex digits (the same value as the zip's own CRC field).
        codec: ``"zstd"``.
        pickled: whether the value holds a cloudpickled part (loading it needs ``allow_pickle=True``).
        path: the object holding the member, relative to the run, when it is not the snapshot's own archive
            (each rank of a distributed save writes its own archive); None for the snapshot's archive.
    """

    name: str
    offset: int
    stored_size: int
    raw_size: int
    crc32: str
    codec: str = "zstd"
    pickled: bool = False
    path: str | None = None

    @property
    def ratio(self) -> float:
        """Compression ratio, raw size over stored size."""
        return self.raw_size / self.stored_size if self.stored_size else 1.0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "offset": self.offset,
            "stored_size": self.stored_size,
            "raw_size": self.raw_size,
            "crc32": self.crc32,
            "codec": self.codec,
            "pickled": self.pickled,
        }
        if self.path is not None:
            out["path"] = self.path
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> MemberInfo:
        return cls(
            name=str(d["name"]),
            offset=_nonneg(d["offset"]),
            stored_size=_nonneg(d["stored_size"]),
            raw_size=_nonneg(d["raw_size"]),
            crc32=str(d["crc32"]),
            codec=str(d.get("codec", "zstd")),
            pickled=bool(d.get("pickled", False)),
            path=_relative_path(d["path"]) if d.get("path") is not None else None,
        )


@dataclass(frozen=True)
class SnapshotInfo:
    """A committed snapshot as the manifest records it.

    Attributes:
        itr: the iteration it was saved at.
        path: the archive's path relative to the run root (``snapshots/<itr>-<token>.zip``).
        url: the archive's full URL, credentials redacted.
        size: the archive's size in bytes.
        created: when it was saved (UTC).
        metrics: the metrics saved with it.
        members: key -> :class:`MemberInfo`, in the order the state was saved.
        format_version: the archive format version.
        refs: other objects (relative paths) this snapshot needs, such as content-addressed buffer chunks
            shared with other snapshots; garbage collection keeps every object a committed snapshot refers to.
        checksums: object (relative path) -> checksum of all its bytes, ``"crc32:<8 hex>"``
            (:func:`crc32_checksum`), recorded at commit for the archives it needs (its ``path`` and its members'
            ``path``s); ``verify`` and copies check every byte of an object listed here. Empty for entries
            written before bucketsnap recorded them: only their members can be checked then.
    """

    itr: int
    path: str
    url: str
    size: int
    created: datetime
    metrics: dict[str, Metric] = field(default_factory=dict)
    members: dict[str, MemberInfo] = field(default_factory=dict)
    format_version: int = 1
    refs: tuple[str, ...] = ()
    checksums: dict[str, str] = field(default_factory=dict)

    def keys(self) -> list[str]:
        """The saved top-level keys."""
        return list(self.members)

    def objects(self) -> set[str]:
        """Every object (relative path) this snapshot needs: its archive, member archives, and refs."""
        return {self.path, *(m.path for m in self.members.values() if m.path), *self.refs}

    def to_json(self) -> dict[str, Any]:
        return {
            "itr": self.itr,
            "path": self.path,
            "size": self.size,
            "created": self.created.isoformat(),
            "metrics": self.metrics,
            "members": {k: m.to_json() for k, m in self.members.items()},
            "format_version": self.format_version,
            **({"refs": list(self.refs)} if self.refs else {}),
            **({"checksums": dict(self.checksums)} if self.checksums else {}),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any], *, base_url: str) -> SnapshotInfo:
        """Parse a manifest entry; raise CorruptSnapshotError (naming ``base_url``) if malformed."""
        try:
            path = _relative_path(d["path"])
            created = datetime.fromisoformat(str(d["created"]))
            if created.tzinfo is None:
                created = created.replace(tzinfo=timezone.utc)
            itr = d["itr"]
            if not isinstance(itr, int) or isinstance(itr, bool) or itr < 0:
                raise ValueError(f"bad itr {itr!r}")
            return cls(
                itr=itr,
                path=path,
                url=f"{base_url}/{path}",
                size=_nonneg(d["size"]),
                created=created,
                metrics=check_metrics(d.get("metrics") or {}),
                members={str(k): MemberInfo.from_json(m) for k, m in dict(d["members"]).items()},
                format_version=int(d.get("format_version", 1)),
                refs=tuple(_relative_path(r) for r in d.get("refs", ())),
                checksums=_checksums(d.get("checksums", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptSnapshotError(f"malformed manifest entry in {base_url}: {exc!r}") from exc


def check_metrics(metrics: Any) -> dict[str, Metric]:
    """Validate metrics: a mapping of str to finite numbers, str, bool or None (torch/numpy scalars are converted)."""
    if not isinstance(metrics, dict):
        raise ValueError(f"metrics must be a dict of name -> number, not {type(metrics).__name__}")
    out: dict[str, Metric] = {}
    for name, value in metrics.items():
        if not isinstance(name, str):
            raise ValueError(f"metric names must be str, got {name!r}")
        if hasattr(value, "item") and not isinstance(value, (str, bytes)):
            value = value.item()  # torch / numpy scalars
        if not isinstance(value, (int, float, str, bool)) and value is not None:
            raise ValueError(f"metric {name!r} must be a number, str, bool or None, not {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"metric {name!r} is {value}; metrics must be finite")
        out[name] = value
    return out


def _checksums(v: Any) -> dict[str, str]:
    """A manifest entry's ``checksums``: relative path -> ``"<algorithm>:<hex>"``.

    Another algorithm than ``crc32`` is accepted (a later writer may record one), so that this reader still
    loads the run; ``verify`` says it cannot check it.
    """
    if not isinstance(v, dict):
        raise ValueError(f"checksums must be an object, not {type(v).__name__}")
    out: dict[str, str] = {}
    for path, checksum in v.items():
        if not isinstance(checksum, str) or not _CHECKSUM.fullmatch(checksum):
            raise ValueError(f"bad checksum {checksum!r} of {path!r}")
        if checksum.startswith("crc32:") and not _CRC32_CHECKSUM.fullmatch(checksum):
            raise ValueError(f"bad CRC-32 {checksum!r} of {path!r}: expected crc32:<8 lowercase hex>")
        out[_relative_path(path)] = checksum
    return out


def _relative_path(v: Any) -> str:
    """A path inside the run: relative, no ``..``, no NUL."""
    path = str(v)
    if not path or path.startswith(("/", "\\")) or ".." in path.split("/") or "\x00" in path or "://" in path:
        raise ValueError(f"path {path!r} escapes the run")
    return path


def _nonneg(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"expected a non-negative int, got {v!r}")
    return v
