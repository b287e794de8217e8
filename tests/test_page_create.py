"""A manifest page whose create reached the store but whose answer was lost (docs/protocol.md, "The log"): the
store's client retries the create, which finds the page there. The retry must see that the page is its own (the
same bytes) and commit; a page there with other bytes is a one-line ``StorageError`` naming it, and nothing is
committed or lost."""

from __future__ import annotations

import contextlib
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import pytest

from bucketsnap import SnapshotStore, StorageError
from bucketsnap._pages import PAGE_DIR, TAIL
from bucketsnap._storage import Storage
from conftest import Backend
from helpers import TcpProxy
from test_transient_after_contact import _abort, endpoint_of, through


class LosingProxy(TcpProxy):
    """Forwards 127.0.0.1:<port> to ``target``; once :attr:`armed`, the first request whose request line holds
    ``marker`` reaches the server, and its answer is dropped with a TCP reset (the server applied it)."""

    def __init__(self, target: tuple[str, int], marker: bytes) -> None:
        self.marker = marker
        self.armed = False
        self.lost: list[bytes] = []
        super().__init__(target)

    def serve(self, client: socket.socket, upstream: socket.socket) -> None:
        drop = threading.Event()
        threading.Thread(target=self._requests, args=(client, upstream, drop), daemon=True).start()
        threading.Thread(target=self._answers, args=(upstream, client, drop), daemon=True).start()

    def _requests(self, client: socket.socket, upstream: socket.socket, drop: threading.Event) -> None:
        try:
            while data := client.recv(65536):
                line = data.split(b"\r\n", 1)[0]
                with self.lock:
                    if self.armed and line.startswith(b"PUT ") and self.marker in line:
                        self.armed = False
                        self.lost.append(line)
                        drop.set()  # before the request goes on, so its answer is the one dropped
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            _abort(upstream)

    def _answers(self, upstream: socket.socket, client: socket.socket, drop: threading.Event) -> None:
        try:
            while data := upstream.recv(65536):
                if drop.is_set() and not data.startswith(b"HTTP/1.1 1"):  # past a "100 Continue"
                    break  # the server applied the request; its answer is lost
                client.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # wakes the other direction's recv, which holds the socket
                _abort(sock)


@pytest.fixture
def losing_proxy(s3_backend: Backend) -> Iterator[LosingProxy]:
    target = urlsplit(endpoint_of(s3_backend))
    assert target.hostname is not None and target.port is not None
    proxy = LosingProxy((target.hostname, target.port), f"/{PAGE_DIR}/".encode())
    yield proxy
    proxy.close()


def _states(n: int) -> Iterator[tuple[int, dict[str, Any]]]:
    return ((i, {"step": i}) for i in range(n))


@pytest.mark.s3
def test_a_page_create_whose_answer_the_s3_server_lost_is_retried_into_a_commit(
    s3_backend: Backend, losing_proxy: LosingProxy
) -> None:
    store = SnapshotStore(
        f"{s3_backend.url()}/{uuid.uuid4().hex}",
        storage_options=through(s3_backend, f"http://127.0.0.1:{losing_proxy.port}"),
    )
    for itr, state in _states(TAIL - 1):
        store.save(itr, state)
    losing_proxy.armed = True
    store.save(TAIL - 1, {"step": TAIL - 1})  # fills the tail: its commit seals the first page
    assert losing_proxy.lost, "the page's create went through the proxy and its answer was dropped"
    assert store.itrs() == list(range(TAIL))
    fresh = SnapshotStore(store.url, storage_options=s3_backend.options)
    assert fresh.itrs() == list(range(TAIL))
    assert fresh.load(0)["step"] == 0 and fresh.load("last")["step"] == TAIL - 1
    fresh.verify()


def _retrying_create(storage: Storage, monkeypatch: pytest.MonkeyPatch, *, other_bytes: bool) -> list[str]:
    """Page creates that land, lose their answer, and are sent again (as a store's client retries), or that find
    another page with other bytes under their name."""
    seen: list[str] = []
    real = storage.create_exclusive

    def create(rel: str, data: bytes) -> None:
        if rel.startswith(f"{PAGE_DIR}/") and not seen:
            seen.append(rel)
            real(rel, b"{}" if other_bytes else data)
        real(rel, data)

    monkeypatch.setattr(storage, "create_exclusive", create)
    return seen


@pytest.fixture(params=["memory", "local"])
def plain_backend(request: pytest.FixtureRequest) -> Backend:
    return request.getfixturevalue(f"{request.param}_backend")  # type: ignore[no-any-return]


def test_a_retried_page_create_that_finds_its_own_page_commits(
    plain_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SnapshotStore(plain_backend.url())
    for itr, state in _states(TAIL - 1):
        store.save(itr, state)
    seen = _retrying_create(store._storage, monkeypatch, other_bytes=False)
    store.save(TAIL - 1, {"step": TAIL - 1})
    assert seen
    assert SnapshotStore(store.url).itrs() == list(range(TAIL))
    SnapshotStore(store.url).verify()


def test_a_page_that_exists_with_other_bytes_is_a_storage_error_and_nothing_is_committed(
    plain_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SnapshotStore(plain_backend.url())
    for itr, state in _states(TAIL - 1):
        store.save(itr, state)
    seen = _retrying_create(store._storage, monkeypatch, other_bytes=True)
    with pytest.raises(StorageError) as caught:
        store.save(TAIL - 1, {"step": TAIL - 1})
    message = str(caught.value)
    assert "\n" not in message and store._storage.url_of(seen[0]) in message and "save again" in message
    assert type(caught.value) is not FileExistsError
    fresh = SnapshotStore(store.url)
    assert fresh.itrs() == list(range(TAIL - 1)), "nothing committed, nothing lost"
    fresh.verify()
    monkeypatch.undo()
    store.save(TAIL - 1, {"step": TAIL - 1})  # the next save commits under fresh page names
    assert SnapshotStore(store.url).itrs() == list(range(TAIL))
    assert SnapshotStore(store.url).load(TAIL - 1)["step"] == TAIL - 1


def test_a_commit_of_many_pages_recognises_each_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """An upgrade commit seals many pages at once; each create may be retried."""
    store = SnapshotStore(f"memory://page-create/{uuid.uuid4().hex}")
    real = store.save(0, {"step": 0})
    storage = store._storage
    create = storage.create_exclusive
    retried: list[str] = []

    def twice(rel: str, data: bytes) -> None:
        create(rel, data)
        if rel.startswith(f"{PAGE_DIR}/"):
            retried.append(rel)
            create(rel, data)

    monkeypatch.setattr(storage, "create_exclusive", twice)
    store._log.commit(lambda current: [real] + [replace(real, itr=i) for i in range(1, 40 * TAIL)])
    assert len(retried) > 16
    assert SnapshotStore(store.url).itrs() == list(range(40 * TAIL))
