"""Moving bytes to and from object stores: retries with backoff, and pipelined writes.

Two pieces, used by :mod:`bucketsnap._storage` and :mod:`bucketsnap._uploads`:

* :class:`Retry` runs a callable again after a *transient* failure (throttling such as S3's ``SlowDown`` or
  HTTP 429, 5xx responses, a reset or refused connection, a timeout), sleeping with capped exponential backoff
  and full jitter, and gives up after a fixed number of attempts. What counts as transient is decided by
  :func:`is_transient`, which reads the exception chain for the network's own errors (s3fs turns ``SlowDown``
  into ``OSError(EBUSY)`` and a 500 into ``OSError(EREMOTEIO)``; aiohttp has its connection error classes) and
  asks the backend for its client's own (botocore's error codes, gcsfs's ``HttpError``, azure-core's
  exceptions: see :mod:`bucketsnap._backends`). The clients already retry a few times on their own; this layer
  adds patience for longer bursts and a single, clear error at the end. Its :attr:`Retry.connect_timeout`
  bounds the other case, a store that never answered: :class:`bucketsnap._storage.Storage` gives a process's
  first request to a store that long, whatever the clients' own retries would do, then says why the store
  could not be reached (:func:`diagnose` tries the connection itself: refused, a name that does not resolve,
  no answer).
* :func:`read_body_into` copies an HTTP response's body into a caller's buffer piece by piece, as aiohttp
  receives it: the ranged reads of a restore fill a reused buffer instead of a new ``bytes`` joined from the
  pieces for each request (one copy and one fresh allocation fewer per request).
* :class:`ThreadedWriter` puts a background thread in front of any other file object (gcsfs's resumable
  upload, whose chunks must be sent in order), so that compressing the next part overlaps uploading this one.

Concurrent part uploads (S3 multipart, GCS composite) are in :mod:`bucketsnap._uploads`.
"""

from __future__ import annotations

import errno
import logging
import queue
import random
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any, TypeVar

from bucketsnap.errors import StorageError, redact

__all__ = [
    "Retry",
    "ThreadedWriter",
    "chain",
    "copy_into",
    "diagnose",
    "is_server_error",
    "is_throttled",
    "is_transient",
    "read_body_into",
]

logger = logging.getLogger("bucketsnap")

T = TypeVar("T")

_TRANSIENT_ERRNOS = {
    errno.EBUSY,  # s3fs: SlowDown, 503
    getattr(errno, "EREMOTEIO", 121),  # s3fs: InternalError, 500
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.ECONNREFUSED,
    errno.EPIPE,
    errno.EAGAIN,
}
#: Connection and timeout errors of the HTTP layer every object store client here uses (aiohttp) and of fsspec.
_TRANSIENT_CLASS_NAMES = {
    "ClientConnectionError",
    "ClientOSError",
    "ServerDisconnectedError",
    "ClientPayloadError",
    "ServerTimeoutError",
    "FSTimeoutError",
}
_THROTTLE_WORDS = ("SlowDown", "Throttl", "TooManyRequests", "reduce your request rate", "ServerBusy")


def _no(exc: BaseException) -> bool:
    return False


def chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or during, each once."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def is_transient(exc: BaseException, vendor: Callable[[BaseException], bool] = _no) -> bool:
    """Whether ``exc`` (or an exception in its chain) is worth retrying: throttling, 5xx, connection, timeout.

    This knows the network's errors (the standard library's, aiohttp's, fsspec's); ``vendor`` adds a store
    client's own, one exception at a time (each backend module passes its table). Not found, exists, permission
    and precondition failures are never transient.
    """
    for current in chain(exc):
        if isinstance(current, (FileNotFoundError, FileExistsError, PermissionError)):
            return False
        if isinstance(current, (ConnectionError, TimeoutError)):
            return True
        if isinstance(current, OSError) and current.errno in _TRANSIENT_ERRNOS:
            return True
        if any(cls.__name__ in _TRANSIENT_CLASS_NAMES for cls in type(current).__mro__):
            return True
        if vendor(current):
            return True
    return False


def is_throttled(exc: BaseException, vendor: Callable[[BaseException], bool] = _no) -> bool:
    """Whether the server refused ``exc``'s request for load (so it certainly did not apply it).

    ``vendor`` recognises a store client's own throttling answer (an HTTP 429 in its own error class).
    """
    for current in chain(exc):
        text = f"{type(current).__name__} {current}"
        if any(word in text for word in _THROTTLE_WORDS) or vendor(current):
            return True
    return False


def copy_into(buffer: memoryview, data: bytes | bytearray | memoryview) -> int:
    """Copy ``data`` to the start of ``buffer`` (bytes); its length. Raises OSError where it does not fit: the
    server answered a ranged read with more than the range (a server that ignores ``Range`` sends the whole
    object), which must never be taken for the bytes asked for."""
    n = len(data)
    if n > buffer.nbytes:
        raise OSError(f"the server answered a ranged read of {buffer.nbytes} bytes with {n}")
    buffer[:n] = data
    return n


async def read_body_into(content: Any, buffer: memoryview) -> int:
    """Copy the body of an HTTP response (aiohttp's ``StreamReader``) into ``buffer`` (bytes) as its pieces
    arrive, each once; the bytes received. Raises OSError where the body is longer than ``buffer``, and what
    aiohttp raises for a body cut short (``ClientPayloadError``: transient)."""
    got = 0
    size = buffer.nbytes
    while True:
        piece, end_of_http_chunk = await content.readchunk()  # one received piece as is, never a join of them
        if not piece:
            if end_of_http_chunk:
                continue
            return got
        n = len(piece)
        if got + n > size:
            raise OSError(f"the server answered a ranged read of {size} bytes with more")
        buffer[got : got + n] = piece
        got += n


def check_length(got: int, content_range: str | None) -> int:
    """``got``, the bytes a ranged read received, checked against its response's ``Content-Range`` (``bytes
    a-b/total``): a body that ended before byte ``b`` was cut in transit, which raises a transient
    ``OSError(ECONNRESET)`` (retried), not a short read that a reader takes for a truncated object."""
    match = re.fullmatch(r"bytes (\d+)-(\d+)/(?:\d+|\*)", (content_range or "").strip())
    declared = int(match.group(2)) - int(match.group(1)) + 1 if match else 0
    if got < declared:
        raise OSError(errno.ECONNRESET, f"the response ended after {got} of the {declared} bytes it declared")
    return got


def is_server_error(status: object) -> bool:
    """Whether an HTTP status asks for a retry: 429 (too many requests) or any 5xx."""
    return isinstance(status, int) and (status == 429 or 500 <= status < 600)


@dataclass(frozen=True)
class Retry:
    """Retry transient failures with capped exponential backoff and full jitter.

    Attributes:
        attempts: tries in all (1: no retry).
        initial: the first backoff, in seconds; each next one doubles, up to ``max_delay``.
        max_delay: the longest sleep between two tries.
        connect_timeout: seconds a store gets to answer a process's first request (at most ``attempts``
            tries): a store that refuses the connection, whose name does not resolve or that does not answer
            in time fails with a :class:`~bucketsnap.StorageError` saying which, instead of waiting for the
            store clients' own retries (an explicit endpoint that refuses TCP connections ``attempts`` times
            over 2 s fails then: a local server that was not started). Once a store has answered, its
            connection errors are retried as transient.
    """

    attempts: int = 5
    initial: float = 0.25
    max_delay: float = 8.0
    connect_timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, not {self.attempts}")
        if not self.connect_timeout > 0:
            raise ValueError(f"connect_timeout must be positive, not {self.connect_timeout}")

    def delay(self, attempt: int) -> float:
        """The sleep after failed try number ``attempt`` (0-based): uniform in [0, min(max, initial * 2**n)]."""
        return random.uniform(0, min(self.max_delay, self.initial * 2**attempt))

    def call(
        self,
        fn: Callable[[], T],
        *,
        what: str,
        retryable: Callable[[BaseException], bool] = is_transient,
        advice: str = "Retry later, or lower the upload concurrency.",
    ) -> T:
        """Run ``fn``; on a failure ``retryable`` accepts, sleep and try again, up to :attr:`attempts` tries.

        ``advice`` ends the message of the error raised when the tries run out (what to do: a read has no
        upload concurrency to lower).

        Raises:
            StorageError: the last failure was retryable but the attempts ran out (its cause is that failure).
            Exception: a failure that is not retryable, unchanged.
        """
        for attempt in range(self.attempts):
            try:
                return fn()
            except Exception as exc:
                if not retryable(exc):
                    raise
                if attempt + 1 == self.attempts:
                    raise StorageError(
                        f"{what} failed {self.attempts} times with transient errors, last: {type(exc).__name__}: "
                        f"{redact(str(exc))[:300]}. The store may be throttling or unreachable; committed "
                        f"snapshots are intact. {advice}"
                    ) from exc
                sleep = self.delay(attempt)
                logger.warning("%s: transient %s, retrying in %.2fs: %s", what, type(exc).__name__, sleep, exc)
                time.sleep(sleep)
        raise AssertionError("unreachable")  # pragma: no cover


def diagnose(url: str, timeout: float = 3.0) -> str:
    """Why a TCP connection to ``url``'s host and port fails, in words; "" if it connects (or goes through a
    proxy, which a direct connection would not test).

    >>> diagnose("http://no-such-host.invalid:9000")
    'the host name no-such-host.invalid does not resolve (DNS)'
    """
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname
    if not host:
        return ""
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return f"{url} has no valid port"
    if _proxied(parts.scheme or "https", host):
        return ""
    found: list[str] = []

    def connect() -> None:  # in a thread: a name lookup has no timeout of its own
        try:
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):
            found.append(f"the host name {host} does not resolve (DNS)")
            return
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except ConnectionRefusedError:
            found.append(f"{host}:{port} refused the connection (nothing listens there)")
        except TimeoutError:
            found.append(f"{host}:{port} did not accept a connection within {timeout:g} s")
        except OSError as exc:
            found.append(f"cannot connect to {host}:{port} ({exc.strerror or exc})")

    thread = threading.Thread(target=connect, name="bucketsnap-diagnose", daemon=True)
    thread.start()
    thread.join(timeout + 2.0)
    if thread.is_alive():
        return f"looking up the host name {host} took more than {timeout + 2:g} s (DNS)"
    return found[0] if found else ""


def _proxied(scheme: str, host: str) -> bool:
    import urllib.request  # here: it imports http.client, email and ssl, which importing bucketsnap never needs

    proxies = urllib.request.getproxies()
    if not (proxies.get(scheme) or proxies.get("all")):
        return False
    return not urllib.request.proxy_bypass(host)


class ThreadedWriter:
    """Writes to ``dest`` from a background thread, so producing the next part overlaps storing this one.

    At most ``depth`` parts of ``part_size`` bytes wait in the queue, plus the one being filled.

    Args:
        dest: the file object to write (not closed here).
        part_size: bytes handed to the thread at a time.
        depth: parts that may wait for the thread.
    """

    def __init__(self, dest: IO[bytes], *, part_size: int, depth: int = 2) -> None:
        self._dest = dest
        self._part_size = part_size
        self._buffer = bytearray()
        self._queue: queue.Queue[bytearray | None] = queue.Queue(maxsize=max(1, depth))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="bucketsnap-writer", daemon=True)
        self._thread.start()
        self.closed = False

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._check()
        view = memoryview(data).cast("B")
        self._buffer += view
        if len(self._buffer) >= self._part_size:
            self._put(self._buffer)  # handed over, not copied: a new buffer follows
            self._buffer = bytearray()
        return view.nbytes

    def flush(self) -> None:
        pass

    def close(self) -> None:
        """Hand over the rest and wait until the thread has written everything; raise its error."""
        if self.closed:
            return
        self.closed = True
        if self._buffer:
            self._put(self._buffer)
        self._buffer = bytearray()
        self._put(None)
        self._thread.join()
        self._check()

    def abort(self) -> None:
        """Stop the thread without writing what is queued; never raises."""
        self.closed = True
        self._error = self._error or RuntimeError("aborted")
        while True:  # unblock a producer-side put and let the thread see the end
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(None)
        self._thread.join()

    def _put(self, item: bytearray | None) -> None:
        while True:
            self._check()
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue  # drain without writing
            try:
                self._dest.write(item)
            except BaseException as exc:
                self._error = exc

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
