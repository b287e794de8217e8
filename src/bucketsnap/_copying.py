"""Copying the objects of one committed snapshot to another run, on the same backend or another one.

:meth:`SnapshotStore.copy_from <bucketsnap.SnapshotStore.copy_from>` uses :func:`copy_objects` to write the
objects, then commits at the destination with the ordinary protocol, so a copy is invisible until it is whole
and a crash mid-copy leaves only orphans for ``gc``.

Naming at the destination: the snapshot's archive, and any other archive holding some of its members
(``MemberInfo.path``), get new unique names, as a save would give them: copying twice, or into a run that
already holds objects of that name, never rewrites an object another snapshot may be committed with. Refs
(``SnapshotInfo.refs``, such as content-addressed chunks shared by several snapshots) keep their names, and one
that already exists at the destination with the same size is reused rather than copied again.

Objects are streamed in ranged chunks, never held whole in memory, and the CRC-32 of every member, and of
every object whose checksum the source recorded (``SnapshotInfo.checksums``), is checked as its bytes pass, so a
corrupt source is refused before anything is committed. The copy records the whole-object CRC-32 of each
archive it writes, under its new name (also for a source committed before checksums were recorded, so that the
copy's own bytes are covered from then on).
"""

from __future__ import annotations

import dataclasses
import posixpath
import re

from bucketsnap._chunk_names import named_checksum
from bucketsnap._info import MemberInfo, SnapshotInfo, crc32_checksum
from bucketsnap._manifest import archive_path, new_token
from bucketsnap._progress import ByteCounter, ProgressCallback
from bucketsnap._storage import Storage
from bucketsnap._zipformat import crc32
from bucketsnap.errors import BucketsnapError, CorruptSnapshotError, SnapshotNotFoundError, StorageError

__all__ = ["COPY_CHUNK", "copy_objects", "new_archive_path"]

#: Bytes read per ranged request while copying.
COPY_CHUNK = 8 * 2**20

_UNIQUE_PREFIX = re.compile(r"^\d{12}-[0-9a-f]{16}")


def new_archive_path(itr: int, like: str | None = None) -> str:
    """A new unique archive path for ``itr``: ``snapshots/<itr, 12 digits>-<16 hex>.zip``.

    With ``like`` (an existing path), the new name keeps its directory and whatever follows its unique prefix,
    such as a ``-rank1.zip`` suffix.

    >>> old = "snapshots/000000000007-0123456789abcdef-rank1.zip"
    >>> new = new_archive_path(7, old)
    >>> new != old, new[:23], new[-10:], len(new) == len(old)
    (True, 'snapshots/000000000007-', '-rank1.zip', True)
    """
    if like is None:
        return archive_path(itr, new_token())
    token = f"{itr:012d}-{new_token()}"
    directory, name = posixpath.split(like)
    rest = _UNIQUE_PREFIX.sub("", name, count=1)
    if rest == name:
        rest = f"-{name}"
    return posixpath.join(directory, f"{token}{rest}")


def copy_objects(
    source: Storage,
    info: SnapshotInfo,
    dest: Storage,
    *,
    progress: ProgressCallback | None = None,
) -> tuple[SnapshotInfo, list[str]]:
    """Write every object snapshot ``info`` of ``source`` needs to ``dest``; commit nothing.

    Returns:
        The snapshot's info at the destination (new archive paths and their checksums, same itr, members and
        metrics), and the paths written under new names (the caller deletes them if its commit fails).

    Raises:
        SnapshotNotFoundError: an object of the committed snapshot is missing at the source.
        CorruptSnapshotError: a member's CRC-32, an object's CRC-32, or an object's size, differs from what was
            committed.
        BucketsnapError: a ref exists at the destination with another size.
        StorageError: the destination kept other bytes than were written.
    """
    objects: dict[str, list[MemberInfo]] = {info.path: []}
    for member in info.members.values():
        objects.setdefault(member.path or info.path, []).append(member)
    renamed = {path: new_archive_path(info.itr, None if path == info.path else path) for path in objects}

    plan: list[tuple[str, str, int, list[MemberInfo]]] = []  # (source path, dest path, size, members in it)
    for path, members in objects.items():
        size = info.size if path == info.path else _size(source, path, info)
        plan.append((path, renamed[path], size, members))
    for ref in info.refs:
        if ref in renamed:
            continue
        size = _size(source, ref, info)
        if dest.exists(ref):
            if dest.size(ref) != size:
                raise BucketsnapError(
                    f"{dest.url_of(ref)} already exists with {dest.size(ref)} bytes, but snapshot itr {info.itr} "
                    f"refers to a {size}-byte object of that name at {source.url}; not overwriting it"
                )
            continue
        plan.append((ref, ref, size, []))

    counter = None if progress is None else ByteCounter(sum(size for _, _, size, _ in plan), progress)
    written: list[str] = []
    checksums = dict(info.checksums)  # refs keep their names, and their checksums if any
    try:
        for src_path, dest_path, size, members in plan:
            if dest_path in renamed.values():
                written.append(dest_path)
            expected = info.checksums.get(src_path) or named_checksum(src_path)
            crc = _copy_one(source, src_path, dest, dest_path, size, members, expected, counter)
            if src_path in renamed:
                checksums.pop(src_path, None)
                checksums[dest_path] = crc32_checksum(crc)
    except BaseException:
        for rel in written:
            dest.delete(rel)
        raise
    new_members = {
        key: dataclasses.replace(m, path=renamed[m.path]) if m.path else m for key, m in info.members.items()
    }
    new_path = renamed[info.path]
    copied = dataclasses.replace(
        info, path=new_path, url=dest.url_of(new_path), members=new_members, checksums=checksums
    )
    return copied, written


def _size(storage: Storage, path: str, info: SnapshotInfo) -> int:
    try:
        return storage.size(path)
    except FileNotFoundError as exc:
        raise SnapshotNotFoundError(
            f"{storage.url_of(path)}, needed by committed snapshot itr {info.itr}, is missing; nothing was copied"
        ) from exc


def _copy_one(
    source: Storage,
    src_path: str,
    dest: Storage,
    dest_path: str,
    size: int,
    members: list[MemberInfo],
    checksum: str | None,
    counter: ByteCounter | None,
) -> int:
    """Stream one object, checking the CRC-32 of each member it holds, and of the whole object against
    ``checksum`` (``"crc32:<8 hex>"``) if the source recorded one, as the bytes pass; return the object's CRC-32.
    """
    where = source.url_of(src_path)
    crcs = {m.name: 0 for m in members}
    whole = 0
    with dest.write(dest_path) as f:
        for start in range(0, size, COPY_CHUNK):
            end = min(size, start + COPY_CHUNK)
            try:
                data = source.read(src_path, start, end)
            except FileNotFoundError as exc:
                raise SnapshotNotFoundError(f"{where} vanished while being copied") from exc
            if len(data) != end - start:
                raise CorruptSnapshotError(f"{where} is shorter than the {size} bytes committed (truncated)")
            for m in members:  # the part of each member inside [start, end)
                lo, hi = max(start, m.offset), min(end, m.offset + m.stored_size)
                if lo < hi:
                    crcs[m.name] = crc32(data[lo - start : hi - start], crcs[m.name])
            whole = crc32(data, whole)
            f.write(data)
            if counter is not None:
                counter.add(len(data))
        if source.size(src_path) != size:
            raise CorruptSnapshotError(f"{where} is not the {size} bytes committed (truncated or replaced)")
        for m in members:
            if f"{crcs[m.name]:08x}" != m.crc32:
                raise CorruptSnapshotError(
                    f"{where} member {m.name}: checksum mismatch (crc32 {crcs[m.name]:08x}, expected {m.crc32}); "
                    "not copied"
                )
        if checksum is not None and checksum.startswith("crc32:") and crc32_checksum(whole) != checksum:
            raise CorruptSnapshotError(
                f"{where}: checksum mismatch ({crc32_checksum(whole)} of its {size} bytes, expected {checksum}): "
                "it differs from what was committed; not copied"
            )
    stored = dest.size(dest_path)
    if stored != size:  # an upload that reported success but kept other bytes: never commit it
        raise StorageError(f"{dest.url_of(dest_path)} holds {stored} bytes after writing {size}; nothing was copied")
    return whole
