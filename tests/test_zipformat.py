"""The zip container: archives bucketsnap writes are read by other zip tools, at every size."""

from __future__ import annotations

import dataclasses
import io
import itertools
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
import zstandard

from bucketsnap._archive import ArchiveWriter, verify_object
from bucketsnap._backends import local as local_backend
from bucketsnap._zipformat import ZipStreamWriter, crc32, data_offset, read_directory
from bucketsnap.errors import CorruptSnapshotError


def _read_range(data: bytes) -> Any:
    return lambda start, end: data[start:end]


def test_archive_is_read_by_pythons_zipfile_and_zstd() -> None:
    buf = io.BytesIO()
    writer = ArchiveWriter(buf)
    weights = torch.randn(300_000)  # incompressible: raw zstd blocks, written as pieces
    writer.add("policy", {"w": weights})
    writer.add("zeros", torch.zeros(500_000))  # compressible: a zstd stream
    writer.add("small", {"step": 3})
    size = writer.finish({"itr": 1})
    data = buf.getvalue()
    assert size == len(data)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None  # every CRC-32 as zipfile computes it
        assert archive.namelist() == ["policy.zst", "zeros.zst", "small.zst", "meta.json"]
        for key, member in writer.members.items():
            zinfo = archive.getinfo(member.name)
            assert (zinfo.file_size, f"{zinfo.CRC:08x}") == (member.stored_size, member.crc32)
            dobj = zstandard.ZstdDecompressor().decompressobj(read_across_frames=True)  # frames, then the index
            raw = dobj.decompress(archive.read(member.name))
            assert len(raw) == member.raw_size, key
        assert archive.read("meta.json").startswith(b"{")
    entries = read_directory(_read_range(data), len(data), where="t")
    for member in writer.members.values():
        assert data_offset(_read_range(data), entries[member.name], len(data), where="t") == member.offset


def test_zip64_entries_are_read_by_zipfile() -> None:
    buf = io.BytesIO()
    zip_ = ZipStreamWriter(buf)
    member = zip_.open_member("a.bin", zip64=True)
    member.write_pieces([b"abc", memoryview(b"defg")])
    zip_.close_member(member)
    zip_.add_bytes("b.txt", b"hello")
    zip_.close()
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as archive:
        assert archive.testzip() is None
        assert archive.read("a.bin") == b"abcdefg"
        assert archive.read("b.txt") == b"hello"


def test_more_than_65535_members_use_the_zip64_end_record() -> None:
    buf = io.BytesIO()
    zip_ = ZipStreamWriter(buf)
    for i in range(70_000):
        zip_.add_bytes(f"m{i}", str(i).encode())
    size = zip_.close()
    data = buf.getvalue()
    assert b"PK\x06\x06" in data[-200:]
    entries = read_directory(_read_range(data), size, where="t")
    assert len(entries) == 70_000
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert len(archive.infolist()) == 70_000
        assert archive.read("m69999") == b"69999"


class _SparseFile:
    """Writes each ``_ZEROS`` piece as a hole, so a 4+ GiB archive costs no disk."""

    def __init__(self, f: Any) -> None:
        self.f = f

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if data is _ZEROS:
            self.f.seek(view.nbytes, os.SEEK_CUR)
        else:
            self.f.write(view)
        return view.nbytes


_ZEROS = memoryview(bytes(64 * 2**20))


def test_members_and_offsets_past_4_gib(tmp_path: Path) -> None:
    """Sizes and offsets that need ZIP64 fields: written as 4.3 GB of holes, read back by zipfile and us."""
    path = tmp_path / "big.zip"
    with open(path, "wb") as f:
        zip_ = ZipStreamWriter(_SparseFile(f))  # type: ignore[arg-type]
        big = zip_.open_member("big.bin", zip64=True)
        pieces = [_ZEROS] * 65  # 4.06 GiB > 0xFFFFFFFF
        big.write_pieces(pieces)
        zip_.close_member(big)
        zip_.add_bytes("after.txt", b"past four gigabytes")
        size = zip_.close()
        f.truncate(size)
    expected_crc = 0
    for piece in pieces:
        expected_crc = zlib.crc32(piece, expected_crc)
    assert big.size == 65 * 64 * 2**20 and big.crc == expected_crc
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("big.bin")
        assert (info.file_size, info.CRC) == (big.size, expected_crc)
        assert archive.getinfo("after.txt").header_offset > 0xFFFFFFFF
        assert archive.read("after.txt") == b"past four gigabytes"
    with open(path, "rb") as f:

        def read_range(start: int, end: int) -> bytes:
            f.seek(start)
            return f.read(end - start)

        entries = read_directory(read_range, size, where="t")
    assert entries["big.bin"].stored_size == big.size
    assert entries["after.txt"].header_offset > 0xFFFFFFFF


def test_a_member_past_4_gib_must_be_opened_as_zip64() -> None:
    class Discard:
        def write(self, data: Any) -> int:
            return memoryview(data).nbytes

    zip_ = ZipStreamWriter(Discard())  # type: ignore[arg-type]
    member = zip_.open_member("big.bin", zip64=False)
    member.write_pieces([_ZEROS] * 65)
    with pytest.raises(ValueError, match="zip64=True"):
        zip_.close_member(member)


def test_duplicate_member_names_are_refused() -> None:
    zip_ = ZipStreamWriter(io.BytesIO())
    zip_.add_bytes("a", b"1")
    with pytest.raises(ValueError, match="duplicate"):
        zip_.add_bytes("a", b"2")


def test_crc32_matches_zlib() -> None:
    data = os.urandom(3 * 2**20 + 17)
    assert crc32(data) == zlib.crc32(data)
    assert crc32(data[1000:], crc32(data[:1000])) == zlib.crc32(data)


def test_local_writev_resumes_after_a_partial_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A regular file may take fewer bytes than asked in one writev: the rest follows, in order."""
    real = os.writev
    calls = []

    def short_writev(fd: int, buffers: list[Any]) -> int:
        calls.append(len(buffers))
        views = [memoryview(b).cast("B") for b in buffers]
        total = sum(v.nbytes for v in views)
        if len(calls) == 1:  # the first call takes only 1000 bytes, stopping inside a piece
            return real(fd, [bytes(b"".join(bytes(v) for v in views)[:1000])])
        return real(fd, views) if total else 0

    monkeypatch.setattr(os, "writev", short_writev)
    pieces = [os.urandom(700), os.urandom(5000), b"", os.urandom(3)]
    writer = local_backend.LocalAtomicWriter(str(tmp_path / "out.bin"))
    writer.file.write(b"head")
    assert writer.file.writev(pieces) == 5703  # type: ignore[attr-defined]
    writer.file.write(b"tail")
    writer.commit()
    assert (tmp_path / "out.bin").read_bytes() == b"head" + b"".join(pieces) + b"tail"
    assert len(calls) == 2


def test_local_saves_write_weights_with_writev(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bucketsnap import SnapshotStore

    real = os.writev
    pieces_written: list[int] = []

    def counting_writev(fd: int, buffers: list[Any]) -> int:
        pieces_written.append(len(buffers))
        return real(fd, buffers)

    monkeypatch.setattr(os, "writev", counting_writev)
    weights = torch.randn(5_000_000)  # 20 MB: 153 raw blocks, 2 batches
    store = SnapshotStore(str(tmp_path / "run"))
    store.save(1, {"policy": {"w": weights}})
    assert pieces_written and max(pieces_written) >= 16 * 18  # 16 frames of 8 raw blocks (16 MiB) per call
    assert torch.equal(store.load(1)["policy"]["w"], weights)
    store.verify(1)


def test_the_writer_keeps_the_crc_of_the_whole_archive() -> None:
    """Headers, descriptors and directory CRC'd as written, member data folded in: the CRC-32 of every byte."""
    buf = io.BytesIO()
    zip_ = ZipStreamWriter(buf)
    member = zip_.open_member("a.bin", zip64=True)
    member.write_pieces([os.urandom(300), memoryview(os.urandom(5000)), b""])
    with pytest.raises(ValueError, match="member is open"):
        _ = zip_.crc
    zip_.close_member(member)
    zip_.add_bytes("b.txt", b"hello")
    small = zip_.open_member("c.bin", zip64=False)
    small.write(b"xyz")
    zip_.close_member(small)
    zip_.close()
    assert zip_.crc == zlib.crc32(buf.getvalue())

    buf = io.BytesIO()
    writer = ArchiveWriter(buf)
    writer.add("policy", {"w": torch.randn(300_000)})  # raw zstd blocks, written as pieces
    writer.add("zeros", torch.zeros(500_000))  # a zstd stream
    assert writer.checksum is None
    writer.finish({"itr": 1})
    assert writer.checksum == f"crc32:{zlib.crc32(buf.getvalue()):08x}"


def test_verify_object_checks_every_byte_and_each_member() -> None:
    buf = io.BytesIO()
    writer = ArchiveWriter(buf)
    writer.add("a", {"x": torch.arange(100)})
    writer.add("b", "text")
    size = writer.finish({"itr": 1})
    data = bytearray(buf.getvalue())
    assert writer.checksum is not None
    members = list(writer.members.values())
    reads: list[tuple[int, int]] = []

    def read_range(start: int, end: int) -> bytes:
        reads.append((start, end))
        return bytes(data[start:end])

    verify_object(read_range, size, writer.checksum, members, where="t")
    covered = sorted(reads)
    assert covered[0][0] == 0 and covered[-1][1] == size
    assert all(a[1] == b[0] for a, b in itertools.pairwise(covered)), "every byte read exactly once"
    last = max(members, key=lambda m: m.offset)
    for position, expected in [(5, "checksum mismatch"), (size - 3, "checksum mismatch"), (last.offset, "b.zst")]:
        data[position] ^= 0x10
        with pytest.raises(CorruptSnapshotError, match=expected):
            verify_object(read_range, size, writer.checksum, members, where="t")
        data[position] ^= 0x10
    overlapping = [members[0], dataclasses.replace(members[1], offset=members[0].offset + 1)]
    with pytest.raises(CorruptSnapshotError, match="overlaps"):
        verify_object(read_range, size, writer.checksum, overlapping, where="t")
