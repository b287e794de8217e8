"""A wrapping fsspec filesystem that fails chosen operations on a seeded schedule, registered as ``faulty://``.

    plan = FaultPlan(seed=1, rate=0.1)
    store = SnapshotStore("faulty://bucket/run", storage_options={"plan": plan, "target_protocol": "memory"})

Every call is forwarded to the target filesystem (``memory`` by default, or ``s3`` with ``target_options``),
unless the plan draws a fault for it. Faults are raised the way s3fs surfaces them once its own retries are
spent: connection resets and timeouts as botocore's ``ConnectionClosedError`` / ``ReadTimeoutError``, HTTP 500
and 503 SlowDown as the ``OSError`` that ``s3fs.errors.translate_boto_error`` makes of the ``ClientError``. The
others are silent: a short read returns fewer bytes than asked, a write stores truncated or altered data and
reports success, and a lost response performs the write and then raises a connection reset.
"""

from __future__ import annotations

import io
import random
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import fsspec
from botocore.exceptions import ClientError, ConnectionClosedError, ReadTimeoutError
from fsspec.spec import AbstractFileSystem
from s3fs.errors import translate_boto_error

ENDPOINT = "https://s3.faulty.invalid"
TRANSIENT = ("reset", "timeout", "http500", "slowdown")
#: The fault kinds each operation can draw.
KINDS_BY_OP: dict[str, tuple[str, ...]] = {
    "read": (*TRANSIENT, "short_read"),
    "meta": TRANSIENT,
    "write": TRANSIENT,
    "close": (*TRANSIENT, "truncated_write", "altered_write", "lost_response"),
    "create": (*TRANSIENT, "lost_response"),
}
ALL_KINDS = tuple(sorted({k for kinds in KINDS_BY_OP.values() for k in kinds}))
#: Faults after which the stored data is not what the caller wrote, though no error was raised.
SILENT_DATA_FAULTS = ("truncated_write", "altered_write")


def transient_error(kind: str, op: str) -> Exception:
    """The exception s3fs raises for ``kind`` after its own retries."""
    if kind == "reset":
        return ConnectionClosedError(endpoint_url=ENDPOINT)
    if kind == "timeout":
        return ReadTimeoutError(endpoint_url=ENDPOINT)
    code, status, message = {
        "http500": ("InternalError", 500, "We encountered an internal error. Please try again."),
        "slowdown": ("SlowDown", 503, "Please reduce your request rate."),
    }[kind]
    error = ClientError(
        {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}, op
    )
    return translate_boto_error(error)  # type: ignore[no-any-return]


@dataclass
class FaultPlan:
    """A seeded schedule: each operation draws a fault with probability ``rate`` among ``kinds``.

    Attributes:
        injected: how many faults of each kind were injected.
        log: (op, kind, path) of each fault, in order.
        enabled: set False to let every call through (for checks after a faulty phase).
    """

    seed: int = 0
    rate: float = 0.05
    kinds: tuple[str, ...] = ALL_KINDS
    enabled: bool = True
    injected: Counter[str] = field(default_factory=Counter)
    log: list[tuple[str, str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()

    def draw(self, op: str, path: str) -> str | None:
        with self._lock:
            if not self.enabled:
                return None
            kinds = [k for k in KINDS_BY_OP[op] if k in self.kinds]
            if not kinds or self._rng.random() >= self.rate:
                return None
            kind = self._rng.choice(kinds)
            self.injected[kind] += 1
            self.log.append((op, kind, path))
            return kind

    def randint(self, a: int, b: int) -> int:
        with self._lock:
            return self._rng.randint(a, b)

    def __repr__(self) -> str:  # fsspec tokenizes the options to cache instances: one instance per plan
        return f"FaultPlan(seed={self.seed}, rate={self.rate}, id={id(self):x})"


class FaultyFileSystem(AbstractFileSystem):  # type: ignore[misc]
    """Forwards to ``target_protocol`` with ``target_options``; ``plan`` decides which calls fail."""

    protocol = ("faulty",)
    root_marker = ""

    def __init__(
        self,
        plan: FaultPlan | None = None,
        target_protocol: str = "memory",
        target_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.plan = plan or FaultPlan(rate=0.0)
        self.target = fsspec.filesystem(target_protocol, **(target_options or {}))
        self._create_lock = threading.Lock()

    def _fault(self, op: str, path: str, *, before: bool = True) -> str | None:
        kind = self.plan.draw(op, path)
        if kind in TRANSIENT and before:
            raise transient_error(kind, op)
        return kind

    # -- reads and metadata ----------------------------------------------------------------------------

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        kind = self._fault("read", path)
        data: bytes = self.target.cat_file(path, start=start, end=end, **kwargs)
        if kind == "short_read" and len(data) > 1:
            return data[: self.plan.randint(0, len(data) - 1)]
        return data

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        self._fault("meta", path)
        return self.target.info(path, **kwargs)  # type: ignore[no-any-return]

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> Any:
        self._fault("meta", path)
        return self.target.ls(path, detail=detail, **kwargs)

    def exists(self, path: str, **kwargs: Any) -> bool:
        self._fault("meta", path)
        return bool(self.target.exists(path, **kwargs))

    def rm_file(self, path: str) -> None:
        self._fault("meta", path)
        self.target.rm_file(path)

    def invalidate_cache(self, path: str | None = None) -> None:
        self.target.invalidate_cache(path)

    # -- writes ------------------------------------------------------------------------------------------

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        kind = self._fault("create" if mode == "create" else "close", path)
        if mode == "create":
            if isinstance(self.target, fsspec.implementations.memory.MemoryFileSystem):
                with self._create_lock:  # the memory target's create is check-then-write: make it atomic
                    if self.target.exists(path):
                        raise FileExistsError(path)
                    self.target.pipe_file(path, value)
            else:
                self.target.pipe_file(path, value, mode="create", **kwargs)
        else:
            self.target.pipe_file(path, _damaged(value, kind, self.plan), **kwargs)
        if kind == "lost_response":
            raise transient_error("reset", "PutObject")

    def open(self, path: str, mode: str = "rb", block_size: int | None = None, **kwargs: Any) -> Any:
        if "w" not in mode:
            raise NotImplementedError("bucketsnap reads through cat_file")
        self._fault("write", path)
        return _FaultyWriter(self, path)


def _damaged(data: bytes, kind: str | None, plan: FaultPlan) -> bytes:
    if kind == "truncated_write" and data:
        return data[: plan.randint(0, len(data) - 1)]
    if kind == "altered_write" and data:
        at = plan.randint(0, len(data) - 1)
        return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]
    return data


class _FaultyWriter:
    """Buffers an upload; each write may fail (a part upload), and close may fail or store damaged data.

    ``closed`` is a plain attribute, as on fsspec's buffered files (bucketsnap sets it after ``discard``).
    """

    def __init__(self, fs: FaultyFileSystem, path: str) -> None:
        self.fs = fs
        self.path = path
        self.buffer = io.BytesIO()
        self.closed = False
        self.discarded = False

    def write(self, b: Any) -> int:
        n = memoryview(b).nbytes
        pos = self.buffer.tell()
        if pos // 2**20 != (pos + n) // 2**20:
            self.fs._fault("write", self.path)  # one draw per MiB, as a multipart upload sends parts
        return self.buffer.write(b)

    def tell(self) -> int:
        return self.buffer.tell()

    def flush(self) -> None:
        pass

    def discard(self) -> None:
        self.discarded = True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.discarded:
            return
        kind = self.fs._fault("close", self.path)
        self.fs.target.pipe_file(self.path, _damaged(self.buffer.getvalue(), kind, self.fs.plan))
        if kind == "lost_response":
            raise transient_error("reset", "CompleteMultipartUpload")


fsspec.register_implementation("faulty", FaultyFileSystem, clobber=True)
