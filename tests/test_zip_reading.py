"""bucketsnap._zipformat's readers: one zip member reader and one byte-range reader, shared by every caller."""

from __future__ import annotations

import io
import os
import threading
import zipfile
import zlib

import pytest

from bucketsnap._zipformat import READ_CHUNK, RangeReader, read_directory, read_member
from bucketsnap.errors import CorruptSnapshotError


def _zip(**members: tuple[bytes, int]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, (data, method) in members.items():
            z.writestr(name, data, compress_type=method)
    return buf.getvalue()


def test_read_member_reads_stored_and_deflated_members_checked_against_their_crc() -> None:
    text = b"bucketsnap " * 1000
    raw = bytearray(_zip(stored=(b"as is", zipfile.ZIP_STORED), deflated=(text, zipfile.ZIP_DEFLATED)))
    entries = read_directory(lambda s, e: bytes(raw[s:e]), len(raw), where="z")
    assert read_member(lambda s, e: bytes(raw[s:e]), entries["stored"], len(raw), where="z") == b"as is"
    assert read_member(lambda s, e: bytes(raw[s:e]), entries["deflated"], len(raw), where="z") == text
    with pytest.raises(CorruptSnapshotError, match=r"'deflated' uses zip method 8, not STORED \(0\)"):
        read_member(lambda s, e: bytes(raw[s:e]), entries["deflated"], len(raw), where="z", methods=(0,))
    at = raw.index(b"as is")
    raw[at] ^= 1
    with pytest.raises(CorruptSnapshotError, match="'stored' does not match the CRC-32 in the zip directory"):
        read_member(lambda s, e: bytes(raw[s:e]), entries["stored"], len(raw), where="z")
    start = entries["deflated"].header_offset + 30 + len("deflated")
    raw[start : start + 8] = b"\xff" * 8  # not a deflate stream any more
    with pytest.raises(CorruptSnapshotError, match="'deflated'"):
        read_member(lambda s, e: bytes(raw[s:e]), entries["deflated"], len(raw), where="z")


@pytest.mark.parametrize("read_ahead", [0, 3])
def test_range_reader_reads_exactly_its_range_in_chunks(read_ahead: int) -> None:
    data = os.urandom(3 * READ_CHUNK + 5)
    requests: list[tuple[int, int]] = []
    lock = threading.Lock()

    def read_range(start: int, end: int) -> bytes:
        with lock:
            requests.append((start, end))
        return data[start:end]

    reader = RangeReader(read_range, 7, len(data) - 9, where="r", read_ahead=read_ahead)
    assert reader.read(10) == data[7:17]
    assert reader.finish() == zlib.crc32(data[7:-2])
    assert sorted(requests) == [(7 + i * READ_CHUNK, min(len(data) - 2, 7 + (i + 1) * READ_CHUNK)) for i in range(3)]
    # a CRC-32 continued from the bytes before the range is the CRC-32 of the whole
    assert RangeReader(read_range, 7, 100, where="r", crc=zlib.crc32(data[:7])).finish() == zlib.crc32(data[:107])


def test_range_reader_refuses_a_short_read() -> None:
    reader = RangeReader(lambda s, e: b"x" * (e - s - 1), 0, 10, where="obj")
    with pytest.raises(CorruptSnapshotError, match="obj: truncated: wanted bytes 0-10, got 9"):
        reader.read(10)
