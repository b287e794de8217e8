"""PartUploader's part buffers: reused once their part is uploaded, never more than ``concurrency + 1`` of them,
never refilled while a request may still read them (_uploads' module docstring)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from bucketsnap import StorageError
from bucketsnap._transport import Retry
from bucketsnap._uploads import PartUploader

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
