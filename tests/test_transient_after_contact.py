"""A store that has answered and then drops connections gets the normal retries, not the first contact's fast
failure (issue 16): "Once the store has answered, its connection errors are transient like any other and
retried" (docs/backends.md, docs/cli.md).

Each test puts a TCP proxy between bucketsnap and a real test server (LocalStack or moto, fake-gcs-server,
Azurite). After a first save through it, the proxy resets every open connection and the next few it accepts,
as a server that died and came back would. Saves and loads then succeed through the retries (of the store's
client and bucketsnap's :class:`~bucketsnap.Retry`), and every reset was met; a store that stays dead fails
with the retries' ``StorageError`` ("failed N times ... Retry later"), not the first contact's
``UnreachableError``.
"""

from __future__ import annotations

import re
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import torch

from bucketsnap import Retry, SnapshotStore, StorageError, UnreachableError
from conftest import Backend
from helpers import TcpProxy

SERVERS = ["s3", "gcs", "azure"]


class ResettingProxy(TcpProxy):
    """Forwards 127.0.0.1:<port> to ``target``; :meth:`reset` kills live connections and the next ``n``."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.to_reset = 0
        self.resets = 0
        self.live: set[socket.socket] = set()
        super().__init__(target)

    def reset(self, n: int) -> None:
        with self.lock:
            self.to_reset = n
            live, self.live = self.live, set()
        for sock in live:
            _abort(sock)

    def close(self) -> None:
        super().close()
        self.reset(0)

    def admit(self, client: socket.socket) -> bool:
        with self.lock:
            if self.to_reset > 0:
                self.to_reset -= 1
                self.resets += 1
                _abort(client)
                return False
        return True

    def serve(self, client: socket.socket, upstream: socket.socket) -> None:
        with self.lock:
            self.live.update((client, upstream))
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=_pump, args=(src, dst), daemon=True).start()


def _abort(sock: socket.socket) -> None:
    """Close with a TCP reset, as a dying server's kernel does."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        _abort(dst)


def endpoint_of(backend: Backend) -> str:
    if backend.name == "s3":
        return str(backend.options["client_kwargs"]["endpoint_url"])
    if backend.name == "gcs":
        return str(backend.options["endpoint_url"])
    found = re.search(r"BlobEndpoint=(http://[^/;]+)", backend.options["connection_string"])
    assert found is not None
    return found.group(1)


def through(backend: Backend, endpoint: str) -> dict[str, Any]:
    """``backend``'s storage options with ``endpoint`` (``http://host:port``) in place of its server's."""
    options = dict(backend.options)
    if backend.name == "s3":
        options["client_kwargs"] = {**options["client_kwargs"], "endpoint_url": endpoint}
    elif backend.name == "gcs":
        options["endpoint_url"] = endpoint
    else:
        options["connection_string"] = options["connection_string"].replace(endpoint_of(backend), endpoint)
    return options


@pytest.fixture(params=SERVERS)
def server_backend(request: pytest.FixtureRequest) -> Backend:
    request.applymarker(getattr(pytest.mark, request.param))
    return request.getfixturevalue(f"{request.param}_backend")  # type: ignore[no-any-return]


@pytest.fixture
def proxy(server_backend: Backend) -> Iterator[ResettingProxy]:
    target = urlsplit(endpoint_of(server_backend))
    assert target.hostname is not None and target.port is not None
    proxy = ResettingProxy((target.hostname, target.port))
    yield proxy
    proxy.close()


def proxied_store(backend: Backend, proxy: ResettingProxy, retry: Retry) -> SnapshotStore:
    options = through(backend, f"http://127.0.0.1:{proxy.port}")
    return SnapshotStore(backend.url(), storage_options=options, retry=retry)


def test_a_store_that_drops_its_connections_after_answering_is_retried(
    server_backend: Backend, proxy: ResettingProxy
) -> None:
    store = proxied_store(server_backend, proxy, Retry(attempts=8, initial=0.05, max_delay=0.5, connect_timeout=5))
    store.save(1, {"policy": {"w": torch.arange(4.0)}})  # the first contact, the probe and a commit

    proxy.reset(3)  # the open connections and the next three die
    store.save(2, {"policy": {"w": torch.arange(4.0) + 1}, "big": torch.zeros(300_000)})
    assert proxy.resets == 3, "every reset connection was met, and the save went on past them"

    proxy.reset(3)
    assert store.load("last", keys=["policy"])["policy"]["w"].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert store.itrs() == [1, 2]
    assert proxy.resets == 6


@pytest.mark.s3
def test_a_store_that_stays_dead_after_answering_fails_with_the_retries_error(
    s3_backend: Backend,
) -> None:
    target = urlsplit(endpoint_of(s3_backend))
    assert target.hostname is not None and target.port is not None
    proxy = ResettingProxy((target.hostname, target.port))
    try:
        options = through(s3_backend, f"http://127.0.0.1:{proxy.port}")
        # botocore retries once within each of bucketsnap's tries (its default of 4, with backoff, took 15 s)
        options["config_kwargs"] = {**options["config_kwargs"], "retries": {"max_attempts": 1}}
        retry = Retry(attempts=2, initial=0.05, max_delay=0.1, connect_timeout=5)
        store = SnapshotStore(s3_backend.url(), storage_options=options, retry=retry)
        store.save(1, {"step": 1})
        proxy.reset(10**9)
        with pytest.raises(StorageError) as caught:
            store.load("last")
        assert not isinstance(caught.value, UnreachableError)
        message = str(caught.value)
        assert "failed 2 times with transient errors" in message and "Retry later" in message, message
        assert "upload concurrency" not in message, "a read has no upload concurrency to lower"
        assert proxy.resets > 2, "the store's client retried within each of bucketsnap's tries"
    finally:
        proxy.close()
