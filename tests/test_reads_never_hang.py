"""Reads that must not hang (found by review): a process forked after a restore restores on its own (the child's
reads waited forever on the read pool it inherited, whose threads were the parent's), and a GCS response that
stalls mid-body fails and is retried (gcsfs's requests have no timeout)."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import numpy as np
import pytest

from bucketsnap import SnapshotStore
from conftest import Backend
from helpers import TcpProxy


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_child_forked_after_a_restore_restores_from_s3(s3_backend: Backend) -> None:
    store = s3_backend.store("fork")
    data = np.frombuffer(os.urandom(12 * 2**20), np.uint8)  # raw: several units, read on the pool
    store.save(1, {"x": data})
    assert np.array_equal(SnapshotStore(store.url, storage_options=s3_backend.options).load(1)["x"], data)
    pid = os.fork()
    if pid == 0:  # the child: a store of its own (fsspec's are not fork-safe), the same run
        ok = False
        try:
            ok = np.array_equal(SnapshotStore(store.url, storage_options=s3_backend.options).load(1)["x"], data)
        finally:
            os._exit(0 if ok else 1)  # never return into pytest in the child
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.2)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child's restore did not finish in 120 s")


class StallingProxy(TcpProxy):
    """Forwards to ``target``; once :attr:`stall_after` is set, the next response stops after that many bytes,
    its connection left open and silent, as a stalled server's is."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.stall_after, self.stalled = -1, 0
        super().__init__(target)

    def serve(self, client: Any, upstream: Any) -> None:
        threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
        threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: Any, dst: Any, answers: bool) -> None:
        sent, limit = 0, -1
        try:
            while data := src.recv(65536):
                with self.lock:
                    if answers and limit < 0 and self.stall_after >= 0:
                        limit, self.stall_after, self.stalled = self.stall_after, -1, self.stalled + 1
                if limit >= 0 and sent + len(data) > limit:
                    dst.sendall(data[: limit - sent])
                    time.sleep(3600)  # silent, the connection open (a daemon thread: gone with the process)
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass


@pytest.mark.gcs
def test_a_gcs_listing_whose_response_stalls_fails_and_is_retried(
    gcs_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by review: gcsfs's requests have no timeout by default, so a listing (``store.open`` lists
    ``manifest/``) whose response stalled hung forever. Now a request that receives nothing for a while fails,
    and is retried."""
    from urllib.parse import urlsplit

    from bucketsnap._backends import gcs
    from bucketsnap._storage import Storage

    target = urlsplit(gcs_backend.options["endpoint_url"])
    assert target.hostname and target.port
    proxy = StallingProxy((target.hostname, target.port))
    monkeypatch.setattr(gcs, "_READ_STALL", 1.0)  # read when the store is opened
    storage = Storage(
        gcs_backend.url(), storage_options={**gcs_backend.options, "endpoint_url": f"http://127.0.0.1:{proxy.port}"}
    )
    for name in ("a", "b"):
        storage.create_exclusive(f"manifest/{name}.json", b"{}")
    listed: list[Any] = []
    proxy.stall_after = 0  # the next response: nothing at all, the connection left open
    lister = threading.Thread(target=lambda: listed.append(storage.list("manifest")), daemon=True)
    lister.start()
    lister.join(60)
    assert not lister.is_alive(), "the listing whose response stalled never failed"
    assert listed == [["a.json", "b.json"]] and proxy.stalled == 1


@pytest.mark.gcs
@pytest.mark.parametrize("given", [30.0, "client_timeout"])
def test_a_requests_timeout_of_ones_own_replaces_the_default_and_reads_keep_their_stall_limit(
    gcs_backend: Backend, monkeypatch: pytest.MonkeyPatch, given: Any
) -> None:
    """docs/backends.md: a ``requests_timeout`` of your own (seconds, or an aiohttp.ClientTimeout) replaces
    bucketsnap's; a restore's ranged reads keep the stall limit under it."""
    from urllib.parse import urlsplit

    import aiohttp

    from bucketsnap._backends import gcs
    from bucketsnap._storage import Storage

    timeout = aiohttp.ClientTimeout(total=30.0) if given == "client_timeout" else given
    target = urlsplit(gcs_backend.options["endpoint_url"])
    assert target.hostname and target.port
    proxy = StallingProxy((target.hostname, target.port))
    monkeypatch.setattr(gcs, "_READ_STALL", 1.0)
    options = {**gcs_backend.options, "endpoint_url": f"http://127.0.0.1:{proxy.port}", "requests_timeout": timeout}
    storage = Storage(gcs_backend.url(), storage_options=options)
    assert storage.fs.requests_timeout is timeout  # not bucketsnap's default
    assert Storage(gcs_backend.url(), storage_options=gcs_backend.options).fs.requests_timeout.sock_read == 1.0
    data = os.urandom(3 * 2**20)
    with storage.write("snapshots/d.zip") as f:
        f.write(data)
    proxy.stall_after = 64 * 1024
    buffer = bytearray(2 * 2**20)
    began = time.monotonic()
    assert storage.read_into("snapshots/d.zip", 3, buffer) == len(buffer) and proxy.stalled == 1
    assert time.monotonic() - began < 15, "the stalled read waited for the 30 s total, not the 1 s stall limit"
    assert buffer == data[3 : 3 + len(buffer)]


@pytest.mark.gcs
def test_a_gcs_read_whose_response_stalls_fails_and_is_retried(
    gcs_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by review: gcsfs's requests have no timeout by default, so a ranged read whose response stalled
    mid-body hung forever. Now a read that receives nothing for a while fails, and is retried."""
    from urllib.parse import urlsplit

    from bucketsnap._backends import gcs
    from bucketsnap._storage import Storage

    target = urlsplit(gcs_backend.options["endpoint_url"])
    assert target.hostname and target.port
    proxy = StallingProxy((target.hostname, target.port))
    options = {**gcs_backend.options, "endpoint_url": f"http://127.0.0.1:{proxy.port}"}
    storage = Storage(gcs_backend.url(), storage_options=options)
    data = os.urandom(3 * 2**20)
    with storage.write("snapshots/d.zip") as f:
        f.write(data)
    monkeypatch.setattr(gcs, "_READ_STALL", 1.0)
    proxy.stall_after = 64 * 1024  # the headers and the first bytes of the body, then nothing
    buffer = bytearray(2 * 2**20)
    assert storage.read_into("snapshots/d.zip", 3, buffer) == len(buffer) and proxy.stalled == 1
    assert buffer == data[3 : 3 + len(buffer)]
