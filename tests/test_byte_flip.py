"""Byte flips: corrupting any single byte of any committed object is reported by ``verify`` and refused by ``cp``.

Each test flips one byte position at a time of an object on local disk (restoring it after each flip), so every
byte of the archive is covered: the members' data, their local headers and data descriptors, ``meta.json`` and
the central directory.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from bucketsnap import CorruptSnapshotError, Snapshot, SnapshotInfo, SnapshotStore
from bucketsnap._chunks import ChunkedArrays
from bucketsnap._cli import cli

#: XOR masks: a whole byte, its lowest bit, its highest bit.
_PATTERNS = (0xFF, 0x01, 0x80)


def _small_state() -> dict[str, object]:
    return {
        "policy": {"w": torch.arange(12, dtype=torch.float32), "b": torch.zeros(3)},
        "config": {"lr": 3e-4, "name": "ppo", "steps": [1, 2, 3]},
        "obs_mean": np.linspace(0.0, 1.0, 7),
    }


@contextmanager
def _flipped(path: Path, position: int, mask: int) -> Iterator[None]:
    """``path`` with the byte at ``position`` XORed with ``mask``, restored on exit."""
    with open(path, "r+b") as f:
        f.seek(position)
        original = f.read(1)
        f.seek(position)
        f.write(bytes([original[0] ^ mask]))
    try:
        yield
    finally:
        with open(path, "r+b") as f:
            f.seek(position)
            f.write(original)


def _archive(tmp_path: Path) -> tuple[SnapshotStore, Path]:
    store = SnapshotStore(str(tmp_path / "run"))
    store.save(1, _small_state())
    path = tmp_path / "run" / store.info(1).path
    assert 500 < path.stat().st_size < 4096, "the test is sized for an archive of 1-2 KB"
    return store, path


def test_verify_reports_a_flip_of_every_byte_of_an_archive(tmp_path: Path) -> None:
    store, path = _archive(tmp_path)
    store.verify(1)
    passed = []
    for mask in _PATTERNS:
        for position in range(path.stat().st_size):
            with _flipped(path, position, mask):
                try:
                    store.verify(1)
                except CorruptSnapshotError:
                    continue
                passed.append((position, mask))
    assert not passed, f"{len(passed)} single-byte flips passed verify, e.g. (position, mask) {passed[:10]}"
    store.verify(1)  # every byte restored


def _spot_positions(store: SnapshotStore, size: int) -> list[int]:
    """A byte of each part: first local header, each member's data, each data descriptor, meta.json, the end."""
    members = sorted(store.info(1).members.values(), key=lambda m: m.offset)
    positions = {0, 10, size - 1, size - 10, size - 40}
    for m in members:
        positions |= {m.offset - 5, m.offset, m.offset + m.stored_size // 2, m.offset + m.stored_size + 4}
    last = members[-1]
    positions.add((last.offset + last.stored_size + size) // 2)  # inside meta.json
    return sorted(p for p in positions if 0 <= p < size)


def test_copy_from_refuses_a_flipped_archive_and_commits_nothing(tmp_path: Path) -> None:
    source, path = _archive(tmp_path)
    dest = SnapshotStore(str(tmp_path / "dest"))
    for position in _spot_positions(source, path.stat().st_size):
        with _flipped(path, position, 0xFF), pytest.raises(CorruptSnapshotError):
            dest.copy_from(source, 1)
        assert dest.infos() == [], position
        assert not list((tmp_path / "dest" / "snapshots").glob("*")), f"left an object after the flip at {position}"
    copied = dest.copy_from(source, 1)  # the intact source copies, and the copy verifies whole
    assert copied.checksums and set(copied.checksums) == {copied.path}
    dest.verify(1)


def test_bucketsnap_cp_refuses_a_flipped_archive(tmp_path: Path) -> None:
    source, path = _archive(tmp_path)
    dest_url = str(tmp_path / "dest")
    for position in _spot_positions(source, path.stat().st_size)[::3]:
        with _flipped(path, position, 0x01):
            result = CliRunner().invoke(cli, ["cp", source.url, dest_url], catch_exceptions=False)
        assert result.exit_code == 1, (position, result.output)
        assert "checksum mismatch" in result.output, result.output
        assert SnapshotStore(dest_url).infos() == []


def test_verify_reports_a_flip_of_every_byte_of_a_chunk(tmp_path: Path) -> None:
    store = SnapshotStore(str(tmp_path / "run"))
    obs = np.arange(64 * 4, dtype=np.float32).reshape(64, 4)
    buffer = ChunkedArrays({"obs": obs, "done": obs[:, 0] > 100}, 64, kind="test.Buffer", chunk_rows=32)
    store.save(1, {"buffer": buffer, "step": 7})
    chunks = sorted((tmp_path / "run" / "chunks").glob("*"))
    assert len(chunks) == 2
    store.verify(1)
    passed = []
    for chunk in chunks:
        for position in range(chunk.stat().st_size):
            with _flipped(chunk, position, 0xFF):
                try:
                    store.verify(1)
                except CorruptSnapshotError:
                    continue
                passed.append((chunk.name, position))
    assert not passed, f"{len(passed)} single-byte flips of a chunk passed verify, e.g. {passed[:5]}"


def test_the_manifest_entry_records_the_checksum_and_old_entries_still_verify_their_members(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store, path = _archive(tmp_path)
    info = store.info(1)
    assert info.checksums == {info.path: f"crc32:{zlib.crc32(path.read_bytes()):08x}"}
    entry = info.to_json()
    assert entry["checksums"] == info.checksums
    assert SnapshotInfo.from_json(entry, base_url=store.url) == info
    for bad in ({info.path: "crc32:XYZ"}, {info.path: "crc32:1234"}, {"../escape.zip": info.checksums[info.path]}, []):
        with pytest.raises(CorruptSnapshotError, match="malformed manifest entry"):
            SnapshotInfo.from_json({**entry, "checksums": bad}, base_url=store.url)
    later = {**entry, "checksums": {info.path: "sha256:" + "ab" * 32}}  # a later writer's algorithm: still readable
    assert SnapshotInfo.from_json(later, base_url=store.url).checksums[info.path].startswith("sha256:")

    old_entry = {k: v for k, v in entry.items() if k != "checksums"}  # as committed before checksums existed
    old = Snapshot(store.storage, SnapshotInfo.from_json(old_entry, base_url=store.url))
    assert old.info.checksums == {}
    with caplog.at_level(logging.WARNING, logger="bucketsnap"):
        old.verify()
    assert "only its members' data can be checked" in caplog.text
    member = info.members["policy"]
    with _flipped(path, member.offset + member.stored_size // 2, 0x01), pytest.raises(CorruptSnapshotError):
        old.verify()
