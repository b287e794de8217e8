"""PartUploader's part buffers: reused once their part is uploaded, never more than ``concurrency + 1`` of them,
never refilled while a request may still read them (_uploads' module docstring); PartBody, the file object a
part is sent as."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest

from bucketsnap import StorageError
from bucketsnap._transport import Retry
from bucketsnap._uploads import PartBody, PartUploader

FAST = Retry(attempts=1)
KiB = 2**10


class Recording(PartUploader[int]):
    """Keeps each part's bytes (copied when its request ends) and which buffer object carried it."""

    def __init__(self, *, part_size: int, concurrency: int, slow: float = 0.0, fail_part: int | None = None) -> None:
        super().__init__(part_size=part_size, concurrency=concurrency, retry=FAST, where="test://bucket/key")
        self.parts: dict[int, bytes] = {}
        self.buffers: set[int] = set()
        self.held: dict[int, bytearray] = {}  # buffers still referenced, so that their ids stay unique
        self.slow = slow
        self.fail_part = fail_part
        self.whole: bytes | None = None
        self.published: bytes | None = None
        self._lock = threading.Lock()

    def _upload_part(self, number: int, body: bytearray) -> int:
        snapshot = bytes(body)
        time.sleep(self.slow)  # the request still sending: the producer goes on filling other buffers
        if number == self.fail_part:
            raise PermissionError("AccessDenied")
        assert bytes(body) == snapshot, f"part {number}'s buffer was written while its request was in flight"
        with self._lock:
            self.parts[number] = snapshot
            self.buffers.add(id(body))
            self.held[id(body)] = body
        return number

    def _complete(self, parts: list[int]) -> None:
        self.published = b"".join(self.parts[n] for n in parts)

    def _put_whole(self, body: bytearray) -> None:
        self.whole = bytes(body)


def _write(uploader: PartUploader[int], data: bytes, piece: int) -> None:
    for start in range(0, len(data), piece):
        uploader.write(data[start : start + piece])
    uploader.close()


@pytest.mark.parametrize("piece", [3 * KiB + 7, 64 * KiB, 200 * KiB])  # within a part, one part, several
def test_buffers_are_reused_and_the_object_is_exact(piece: int) -> None:
    data = np.random.default_rng(0).bytes(40 * 64 * KiB + 1234)  # 40 full parts and a short last one
    uploader = Recording(part_size=64 * KiB, concurrency=3, slow=0.002)
    _write(uploader, data, piece)
    assert uploader.published == data
    assert len(uploader.parts) == 41
    assert len(uploader.buffers) <= 3 + 1  # the parts in flight and the one being filled


def test_an_object_smaller_than_one_part_is_sent_at_its_own_size() -> None:
    uploader = Recording(part_size=64 * KiB, concurrency=2)
    _write(uploader, b"tiny", 1)
    assert uploader.whole == b"tiny" and not uploader.parts


def test_a_failed_part_publishes_nothing() -> None:
    data = np.random.default_rng(1).bytes(12 * 64 * KiB)
    uploader = Recording(part_size=64 * KiB, concurrency=2, slow=0.002, fail_part=3)
    with pytest.raises(StorageError, match="test://bucket/key"):
        _write(uploader, data, 16 * KiB)
    assert uploader.published is None


def test_a_part_body_reads_its_buffer_in_chunks_and_seeks_back_to_resend() -> None:
    buffer = bytearray(np.random.default_rng(2).bytes(300 * KiB + 5))
    body = PartBody(buffer)
    assert len(body) == len(buffer) and body.readable() and body.seekable() and not body.writable()
    chunks = iter(lambda: body.read(64 * KiB), b"")
    assert b"".join(chunks) == buffer and body.tell() == len(buffer)
    assert body.read(10) == b"" and body.read() == b""
    assert body.seek(0) == 0 and body.read() == buffer  # a retry reads the part again, whole
    assert body.seek(-5, io.SEEK_END) == len(buffer) - 5 and body.read(100) == buffer[-5:]
    body.seek(7)
    target = bytearray(10)
    assert body.readinto(target) == 10 and target == buffer[7:17] and body.tell() == 17
    with pytest.raises(ValueError, match="negative seek"):
        body.seek(-1)


def test_a_part_body_leaves_no_view_of_its_buffer_behind() -> None:
    """The uploader trims and refills a buffer once its request returned: a view left by a read would make
    the trim raise BufferError."""
    buffer = bytearray(b"x" * 1000)
    body = PartBody(buffer)
    body.read(10)
    body.readinto(bytearray(10))
    del buffer[500:]  # raises BufferError while a memoryview of the buffer is alive
    buffer[:3] = b"abc"
    assert len(buffer) == 500
