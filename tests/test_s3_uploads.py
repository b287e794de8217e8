"""An S3 upload's memory: the part buffers, ``(upload_concurrency + 1) * part_size``, and no copy of them in the
client (docs/performance.md, "Bounded memory"; ``PartBody``). Handed a part as a ``bytearray``, aiohttp under
s3fs kept two or three copies of each part in flight; as a file object it reads chunks of at most 1 MiB. Against
the S3 server, with tracemalloc counting every Python allocation of the upload (aiohttp's and botocore's too)."""

from __future__ import annotations

import tracemalloc
import uuid
from typing import Any

import numpy as np
import pytest
import s3fs

from bucketsnap._backends.s3 import S3MultipartWriter
from bucketsnap._transport import Retry

pytestmark = pytest.mark.s3
MiB = 2**20
PART = 5 * MiB  # S3's smallest
CONCURRENCY = 2
#: What the client may hold of each part in flight: botocore reads 1 MiB at a time for its checksum and signature,
#: aiohttp 256 KiB (1 MiB chunks for aws-chunked over HTTPS), and the socket transport keeps what the kernel did
#: not take of a chunk (measured: 2.6 MiB for the two parts in flight; with bytearray bodies, 17 MiB).
CHUNKS_PER_PART = 2 * MiB


def _upload(fs: Any, path: str, data: bytes, *, retry: Retry | None = None) -> None:
    writer = S3MultipartWriter(
        fs, path, part_size=PART, concurrency=CONCURRENCY, retry=retry or Retry(attempts=1), where=f"s3://{path}"
    )
    view = memoryview(data)
    for start in range(0, len(data), MiB):  # the frames writer's pieces are at most 1 MiB
        writer.write(view[start : start + MiB])
    writer.close()


@pytest.fixture
def fs(s3_backend: Any) -> Any:
    return s3fs.S3FileSystem(**s3_backend.options)


def _key(s3_backend: Any) -> str:
    return f"{s3_backend.base.removeprefix('s3://')}/uploads-{uuid.uuid4().hex[:8]}"


def test_an_upload_holds_its_part_buffers_and_no_copy_of_them_in_the_client(s3_backend: Any, fs: Any) -> None:
    data = np.random.default_rng(0).bytes(8 * PART + 12345)  # 8 full parts and a short last one
    _upload(fs, _key(s3_backend), data[: PART + 1])  # the client's models and sessions, loaded before counting
    path = _key(s3_backend)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        _upload(fs, path, data)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    buffers = (CONCURRENCY + 1) * PART
    assert peak >= buffers, "the buffers were not counted: the test measures nothing"
    assert peak < buffers + CONCURRENCY * CHUNKS_PER_PART, (
        f"the upload held {(peak - buffers) / MiB:.1f} MiB beyond its part buffers"
    )
    assert fs.cat_file(path) == data


def test_a_part_retried_after_a_broken_send_is_sent_whole(
    s3_backend: Any, fs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request that read half the part's body and then lost its connection: the retry must read the part from
    its start (a body left at its position would send the second half as the whole part)."""
    real = s3fs.S3FileSystem.call_s3
    broken: list[int] = []

    def call_s3(self: Any, name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "upload_part" and kwargs["PartNumber"] == 2 and not broken:
            body = kwargs["Body"]
            broken.append(len(body.read(PART // 2)))
            raise ConnectionResetError("connection reset by peer (the test broke the send)")
        return real(self, name, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "call_s3", call_s3)
    data = np.random.default_rng(1).bytes(3 * PART + 7)
    path = _key(s3_backend)
    _upload(fs, path, data, retry=Retry(attempts=3, initial=0.01))
    assert broken == [PART // 2]
    assert fs.cat_file(path) == data
