"""The commit's exclusive create is verified before a run relies on it (issue 12, item 4).

An S3-compatible server that ignores ``If-None-Match: *`` accepts every create, so two writers racing for one
manifest generation both "win" and one commit is lost without a word. These tests put a real S3 server (moto)
behind a small HTTP proxy that drops that header, and check that bucketsnap refuses to commit there, commits
with the explicit ``single_writer=True`` opt-in, commits straight to moto (which honours the header) without
losing anything to concurrent writers, and probes the server only once per process and run root.
"""

from __future__ import annotations

import http.client
import http.server
import logging
import threading
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import servers
from bucketsnap import SnapshotStore, StorageError
from bucketsnap._storage import Storage
from helpers import run_together

KEY, SECRET = "AKIAPROBETEST", "s3cr3t-probe-test"  # must never appear in a message


class S3Proxy:
    """A threaded HTTP proxy to an S3 endpoint that records each request and can drop ``If-None-Match``."""

    def __init__(self, upstream: str, *, drop_if_none_match: bool) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.drop_if_none_match = drop_if_none_match
        self.requests: list[tuple[str, str]] = []  # (method, path) as received
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ProxyHandler)
        self._server.daemon_threads = True
        self._server.proxy = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-proxy", daemon=True)
        self._thread.start()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def record(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))

    def probes(self) -> list[tuple[str, str]]:
        """The requests that touched a probe object."""
        with self._lock:
            return [(m, p) for m, p in self.requests if ".probe" in p]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as botocore expects

    def _forward(self) -> None:
        proxy: S3Proxy = self.server.proxy  # type: ignore[attr-defined]
        body = self._body()
        drop = {"content-length", "transfer-encoding", "connection"}
        if proxy.drop_if_none_match:
            drop.add("if-none-match")
        headers = {k: v for k, v in self.headers.items() if k.lower() not in drop}
        proxy.record(self.command, self.path)
        conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
        try:
            conn.request(self.command, self.path, body=body if body or self.command in ("PUT", "POST") else None,
                         headers=headers)  # fmt: skip
            response = conn.getresponse()
            data = response.read()
            reply_headers = response.getheaders()
        finally:
            conn.close()
        self.send_response_only(response.status, response.reason)
        for name, value in reply_headers:
            if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(name, value)
        if self.command == "HEAD":
            self.send_header("Content-Length", response.getheader("Content-Length") or "0")
        else:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    """A moto S3 server of this module's own (moto 5.x refuses ``If-None-Match: *`` on an existing key)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    port = servers.free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def bucket(moto_url: str) -> str:
    return servers.S3Server(moto_url, key=KEY, secret=SECRET).create_bucket()


@pytest.fixture
def dropping_proxy(moto_url: str) -> Iterator[S3Proxy]:
    proxy = S3Proxy(moto_url, drop_if_none_match=True)
    yield proxy
    proxy.close()


@pytest.fixture
def counting_proxy(moto_url: str) -> Iterator[S3Proxy]:
    proxy = S3Proxy(moto_url, drop_if_none_match=False)
    yield proxy
    proxy.close()


def options(endpoint: str) -> dict[str, Any]:
    """Storage options for ``endpoint``, on a filesystem instance of its own (no fsspec instance cache)."""
    return {
        "key": KEY,
        "secret": SECRET,
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        "config_kwargs": {"s3": {"addressing_style": "path"}},
        "skip_instance_cache": True,
    }


def objects(moto_url: str, bucket: str, prefix: str) -> list[str]:
    client = servers.S3Server(moto_url, key=KEY, secret=SECRET).client()
    listing = client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in listing.get("Contents", []))


def test_a_server_that_ignores_if_none_match_is_refused_and_nothing_is_committed(
    moto_url: str, bucket: str, dropping_proxy: S3Proxy
) -> None:
    url = f"s3://{bucket}/run-{uuid.uuid4().hex[:8]}"
    direct = SnapshotStore(url, storage_options=options(moto_url))
    direct.save(1, {"v": 1})
    direct.save(2, {"v": 2})
    before = objects(moto_url, bucket, "")

    proxied = SnapshotStore(url, storage_options=options(dropping_proxy.endpoint_url))
    with pytest.raises(StorageError) as exc:
        proxied.save(3, {"v": 3})
    message = str(exc.value)
    assert f"{url}: the S3 server at {dropping_proxy.endpoint_url} does not honour conditional writes" in message
    assert "If-None-Match: *" in message
    assert "SnapshotStore(url, single_writer=True)" in message
    assert KEY not in message and SECRET not in message

    assert objects(moto_url, bucket, "") == before  # no generation, no archive, no probe object left
    assert direct.itrs() == [1, 2]
    assert direct.load("last") == {"v": 2}
    assert [m for m, _ in dropping_proxy.probes()] == ["PUT", "PUT", "DELETE"]  # the second create was accepted

    with pytest.raises(StorageError, match="does not honour conditional writes"):
        proxied.save(3, {"v": 3})  # the verdict is kept: no second probe
    assert len(dropping_proxy.probes()) == 3
    assert objects(moto_url, bucket, "") == before


def test_single_writer_opt_in_commits_through_such_a_server(
    moto_url: str, bucket: str, dropping_proxy: S3Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"s3://{bucket}/run-{uuid.uuid4().hex[:8]}"
    store = SnapshotStore(url, storage_options=options(dropping_proxy.endpoint_url), single_writer=True)
    with caplog.at_level(logging.WARNING, logger="bucketsnap"):
        for itr in (1, 2, 3):
            store.save(itr, {"v": itr})
    assert store.itrs() == [1, 2, 3]
    assert store.load("last") == {"v": 3}
    assert dropping_proxy.probes() == []  # the opt-in skips the probe
    warned = [r.getMessage() for r in caplog.records if "single_writer=True" in r.getMessage()]
    assert len(warned) == 1, warned
    assert url in warned[0] and "check-then-write" in warned[0]
    # check-then-write still refuses a name that exists
    with pytest.raises(FileExistsError):
        store.storage.create_exclusive("manifest/000000000001.json", b"{}")


def test_moto_honours_if_none_match_and_concurrent_writers_lose_nothing(moto_url: str, bucket: str) -> None:
    url = f"s3://{bucket}/run-{uuid.uuid4().hex[:8]}"
    storage = Storage(url, storage_options=options(moto_url))
    storage.create_exclusive("manifest/.direct-check.tmp-0", b"a")
    with pytest.raises(FileExistsError):
        storage.create_exclusive("manifest/.direct-check.tmp-0", b"b")
    assert storage.read("manifest/.direct-check.tmp-0") == b"a"
    storage.delete("manifest/.direct-check.tmp-0")

    writers, saves = 4, 10

    def own_store(w: int) -> SnapshotStore:
        return SnapshotStore(url, storage_options=options(moto_url))  # a filesystem instance of its own

    def writer(w: int, store: SnapshotStore) -> None:
        for i in range(saves):
            store.save(w * 100 + i, {"w": w, "i": i})

    assert run_together(writers, writer, before=own_store) == []
    reader = SnapshotStore(url, storage_options=options(moto_url))
    assert reader.itrs() == sorted(w * 100 + i for w in range(writers) for i in range(saves))
    assert reader.load(301) == {"w": 3, "i": 1}


def test_the_probe_runs_once_per_process_and_run_root(moto_url: str, bucket: str, counting_proxy: S3Proxy) -> None:
    url = f"s3://{bucket}/run-{uuid.uuid4().hex[:8]}"
    for n in range(3):  # three stores, three filesystem instances, one root
        store = SnapshotStore(url, storage_options=options(counting_proxy.endpoint_url))
        for i in range(3):
            store.save(n * 10 + i, {"n": n})
    probes = counting_proxy.probes()
    assert [m for m, _ in probes] == ["PUT", "PUT", "DELETE"]
    run = url.rsplit("/", 1)[1]
    assert all(p.startswith(f"/{bucket}/{run}/snapshots/.probe-") for _, p in probes)  # before the first upload
    assert len(store.itrs()) == 9
    assert [o for o in objects(moto_url, bucket, run) if "probe" in o] == []

    other = SnapshotStore(f"{url}-b", storage_options=options(counting_proxy.endpoint_url))
    other.save(1, {"n": 1})
    assert len(counting_proxy.probes()) == 6  # another root: probed once more


@pytest.mark.gcs
def test_gcs_commits_after_its_probe(gcs_backend: Any) -> None:
    store = gcs_backend.store()
    store.save(1, {"v": 1})
    store.save(2, {"v": 2})
    assert store.itrs() == [1, 2]
    assert [n for n in store.storage.list("manifest") if "probe" in n] == []
    with pytest.raises(FileExistsError):
        store.storage.create_exclusive("manifest/000000000001.json", b"{}")


def test_a_backend_without_atomic_create_still_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    from fsspec.implementations.memory import MemoryFileSystem

    monkeypatch.setattr("bucketsnap._storage._warned_protocols", set())
    storage = Storage("dir://run", storage_options={"path": "/bucketsnap-dirfs", "fs": MemoryFileSystem()})
    assert not storage.atomic_create
    with pytest.warns(RuntimeWarning, match="no known atomic exclusive create"):
        storage.create_exclusive("manifest/000000000001.json", b"{}")
    with pytest.raises(FileExistsError):
        storage.create_exclusive("manifest/000000000001.json", b"{}")
    assert storage.list("manifest") == ["000000000001.json"]  # no probe on such a backend
