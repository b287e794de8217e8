"""The object store's own ceiling for a transfer: what the store and its client library do with no bucketsnap.

A benchmark that reports bucketsnap's S3, GCS or Azure throughput measures, in the same run and against the same
server, the time the store takes for the same bytes sent or fetched the way bucketsnap sends and fetches them,
and reports bucketsnap's time as a fraction of that ceiling (1.0: as fast as the store allows):

* **upload**: one object from parts of ``part_size`` bytes (bucketsnap's ``DEFAULT_PART_SIZE``), ``concurrency``
  parts in flight (``DEFAULT_UPLOAD_CONCURRENCY``), then published the store's way: S3's
  ``create_multipart_upload`` / ``upload_part`` / ``complete_multipart_upload``, GCS part objects joined by one
  ``compose`` (and deleted), Azure ``stage_block`` / ``commit_block_list``. The body of every part is one
  preallocated buffer of random bytes: nothing is produced, copied or checksummed on the client.
* **download**: ranged GETs of ``chunk`` bytes (bucketsnap's ``READ_CHUNK``), ``concurrency`` at a time
  (``READ_AHEAD``), covering ``size`` bytes of an object; the bytes are dropped as they arrive.

The requests go through the client library bucketsnap's backend uses (s3fs's aiobotocore client, gcsfs's HTTP
session, the Azure SDK's async blob client), awaited together on that filesystem's event loop, where bucketsnap
calls them from its threads. Usage, from a benchmark that started a server::

    from _ceiling import Ceiling, fraction

    ceiling = Ceiling("s3://bucket/ceiling", storage_options)
    put_s, key = ceiling.put(400 * 2**20)   # seconds to upload 400 MiB from parts
    get_s = ceiling.get(key, 400 * 2**20)   # seconds to read it back by ranged GETs
    ceiling.delete(key)
    print(f"{fraction(put_s, bucketsnap_save_s):.0%} of the store's ceiling")

``python benchmarks/_ceiling.py --help`` measures a store alone.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import fsspec
from fsspec.asyn import sync

from bucketsnap._storage import DEFAULT_PART_SIZE, DEFAULT_UPLOAD_CONCURRENCY
from bucketsnap._zipformat import READ_AHEAD, READ_CHUNK

__all__ = ["Ceiling", "fraction", "load_average"]


def fraction(ceiling_s: float, measured_s: float) -> float:
    """bucketsnap's throughput as a fraction of the ceiling's, for the same bytes (1.0: at the ceiling)."""
    return ceiling_s / measured_s


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, for the line that prints a figure."""
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


class Ceiling:
    """Raw transfers to the store a URL names (``s3://``, ``gs://``, ``az://``), under a prefix of that URL.

    Args:
        url: where the ceiling's objects go (a run URL's bucket and a prefix of its own).
        storage_options: the options bucketsnap is given (endpoint, credentials).
        part_size: bytes per uploaded part.
        upload_concurrency: parts in flight.
        chunk: bytes per ranged GET.
        read_concurrency: ranged GETs in flight.
    """

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        *,
        part_size: int = DEFAULT_PART_SIZE,
        upload_concurrency: int = DEFAULT_UPLOAD_CONCURRENCY,
        chunk: int = READ_CHUNK,
        read_concurrency: int = READ_AHEAD,
    ) -> None:
        self.fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self.root = root.rstrip("/")
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self._store = _STORES[protocol](self.fs)
        self.part_size = part_size
        self.upload_concurrency = upload_concurrency
        self.chunk = chunk
        self.read_concurrency = read_concurrency
        self._body = os.urandom(part_size)
        #: Seconds the last :meth:`put` spent publishing its parts (complete, compose and delete, block list).
        self.publish_s = 0.0

    def put(self, size: int) -> tuple[float, str]:
        """Upload a new object of ``size`` bytes from parts; returns (seconds, its path)."""
        path = f"{self.root}/ceiling-{uuid.uuid4().hex[:12]}"
        start = time.perf_counter()
        sync(self.fs.loop, self._put, path, size)
        return time.perf_counter() - start, path

    def get(self, path: str, size: int, *, offset: int = 0) -> float:
        """Seconds to read ``[offset, offset + size)`` of ``path`` by ranged GETs."""
        start = time.perf_counter()
        sync(self.fs.loop, self._get, path, offset, size)
        return time.perf_counter() - start

    def delete(self, path: str) -> None:
        self.fs.rm(path)
        self.fs.invalidate_cache()

    async def _put(self, path: str, size: int) -> None:
        handle = await self._store.start(path)
        slots = asyncio.Semaphore(self.upload_concurrency)

        async def part(number: int, n: int) -> Any:
            async with slots:  # the whole buffer as is (no copy), a copy of its start for a shorter last part
                return await self._store.put_part(handle, number, self._body if n == self.part_size else self._body[:n])

        sizes = [min(self.part_size, size - offset) for offset in range(0, size, self.part_size)]
        parts = await _gather([lambda i=i, n=n: part(i + 1, n) for i, n in enumerate(sizes)])
        start = time.perf_counter()
        await self._store.complete(handle, parts)
        self.publish_s = time.perf_counter() - start

    async def _get(self, path: str, offset: int, size: int) -> None:
        slots = asyncio.Semaphore(self.read_concurrency)

        async def fetch(start: int) -> None:
            async with slots:
                end = min(start + self.chunk, offset + size)
                data = await self._store.get(path, start, end)
                if len(data) != end - start:
                    raise OSError(f"{path}: wanted {end - start} bytes at {start}, got {len(data)}")

        await _gather([lambda s=s: fetch(s) for s in range(offset, offset + size, self.chunk)])


async def _gather(calls: list[Callable[[], Awaitable[Any]]]) -> list[Any]:
    return list(await asyncio.gather(*(call() for call in calls)))


class _S3:
    """aiobotocore through s3fs: a multipart upload, ``Range`` GETs."""

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    async def start(self, path: str) -> Any:
        bucket, key, _ = self.fs.split_path(path)
        out = await self.fs._call_s3("create_multipart_upload", Bucket=bucket, Key=key)
        return bucket, key, out["UploadId"]

    async def put_part(self, handle: Any, number: int, body: bytes) -> Any:
        bucket, key, upload_id = handle
        out = await self.fs._call_s3(
            "upload_part", Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body
        )
        return {"PartNumber": number, "ETag": out["ETag"]}

    async def complete(self, handle: Any, parts: list[Any]) -> None:
        bucket, key, upload_id = handle
        await self.fs._call_s3(
            "complete_multipart_upload",
            Bucket=bucket,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": parts},
        )

    async def get(self, path: str, start: int, end: int) -> bytes:
        bucket, key, _ = self.fs.split_path(path)
        out = await self.fs._call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}")
        async with out["Body"] as body:
            data: bytes = await body.read()
        return data


class _Gcs:
    """gcsfs's HTTP session: part objects joined by one ``compose``, ``Range`` GETs of the media."""

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    async def start(self, path: str) -> Any:
        return path

    async def put_part(self, handle: Any, number: int, body: bytes) -> Any:
        name = f"{handle}.part{number:05d}"
        await self.fs._pipe_file(name, body)
        return name

    async def complete(self, handle: Any, parts: list[Any]) -> None:
        temporary = list(parts)
        while len(parts) > 32:  # one compose takes 32 sources: a tree, as bucketsnap's writer composes
            groups = [parts[i : i + 32] for i in range(0, len(parts), 32)]
            parts = [f"{handle}.compose{len(temporary)}-{i:03d}" for i in range(len(groups))]
            temporary += parts
            for target, group in zip(parts, groups, strict=True):
                await self.fs._merge(target, group)
        await self.fs._merge(handle, parts)
        await self.fs._rm(temporary)

    async def get(self, path: str, start: int, end: int) -> bytes:
        data: bytes = await self.fs._cat_file(path, start=start, end=end)
        return data


class _Azure:
    """The Azure SDK's async blob client (as adlfs holds it): staged blocks, one block list, ranged downloads."""

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    def _client(self, path: str) -> Any:
        container, blob, _ = self.fs.split_path(path)
        return self.fs.service_client.get_blob_client(container, blob)

    async def start(self, path: str) -> Any:
        return self._client(path)

    async def put_part(self, handle: Any, number: int, body: bytes) -> Any:
        block_id = uuid.uuid4().hex
        await handle.stage_block(block_id=block_id, data=body, length=len(body), retry_total=0)
        return block_id

    async def complete(self, handle: Any, parts: list[Any]) -> None:
        from azure.storage.blob import BlobBlock

        await handle.commit_block_list([BlobBlock(block_id=b) for b in parts], retry_total=0)
        await handle.close()

    async def get(self, path: str, start: int, end: int) -> bytes:
        async with self._client(path) as client:
            stream = await client.download_blob(offset=start, length=end - start, retry_total=0)
            return bytes(await stream.readall())


_STORES: dict[str, Callable[[Any], Any]] = {"s3": _S3, "gs": _Gcs, "gcs": _Gcs, "az": _Azure, "abfs": _Azure}


def main() -> None:
    parser = argparse.ArgumentParser(description="The ceiling of one store: raw part uploads and ranged GETs.")
    parser.add_argument("url", help="a prefix on the store, e.g. s3://bucket/ceiling")
    parser.add_argument("--endpoint-url", default=None)
    parser.add_argument("--mb", type=int, default=256, help="MiB per transfer")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    options = {"endpoint_url": args.endpoint_url} if args.endpoint_url else {}
    ceiling = Ceiling(args.url, options)
    size = args.mb * 2**20
    for _ in range(args.runs):
        put_s, path = ceiling.put(size)
        get_s = ceiling.get(path, size)
        ceiling.delete(path)
        print(
            f"{args.mb} MiB: put {put_s:.2f} s (publishing {ceiling.publish_s:.2f} s), get {get_s:.2f} s "
            f"(load {load_average()})"
        )


if __name__ == "__main__":
    main()
