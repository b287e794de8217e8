"""Shared test helpers: a state with every supported value type, a deep equality that checks types, threads
that start together, and worker scripts run in processes forked from a forkserver."""

from __future__ import annotations

import math
import multiprocessing
import os
import runpy
import socket
import subprocess
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


def every_value_type() -> dict[str, Any]:
    """A state whose members cover every value type that must round-trip without pickle."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    dtypes = [
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.int8,
        torch.uint8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.bool,
        torch.complex64,
    ]
    return {
        "policy": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "tensors": {
            **{str(dt): (torch.randn(3, 5) * 10).to(dt) for dt in dtypes},
            "transposed": base.t(),
            "strided": base[:, ::2],
            "bf16_view": base.to(torch.bfloat16)[1:, 2:],
            "scalar": torch.tensor(3.5),
            "empty": torch.empty(0, 3),
            "parameter": nn.Parameter(torch.ones(2, 2)),
            "frozen": nn.Parameter(torch.ones(2), requires_grad=False),
        },
        "numpy": {
            "f32": np.random.default_rng(0).random((3, 4), dtype=np.float32),
            "frames": np.zeros((2, 84, 84), dtype=np.uint8),
            "fortran": np.asfortranarray(np.arange(12).reshape(3, 4)),
            "structured": np.array([(1, 2.5)], dtype=[("a", "<i4"), ("b", "<f8")]),
            "scalar": np.int64(7),
            "f16_scalar": np.float16(1.5),
            "big_endian": np.arange(3, dtype=">i4"),
        },
        "python": {
            "int": 2**70,
            "float": 1.25,
            "nan": float("nan"),
            "inf": float("-inf"),
            "str": "héllo, 世界",
            "none": None,
            "bools": [True, False],
            "nested": [1, [2, [3, {"k": (4, 5)}]]],
            "tuple": (1, (2, 3), []),
            "int_keys": {0: "a", 1: "b"},
            "mixed_keys": {1: "int", "1": "str", (1, 2): "tuple", None: "none", 2.5: "float"},
            "bytes": b"\x00\x01\xff",
            "ordered": OrderedDict([("b", 1), ("a", 2)]),
            "empty": {},
        },
        "step": 12345,
    }


def assert_same(a: Any, b: Any, path: str = "state") -> None:
    """Deep equality that also checks types, dtypes, shapes, and NaN == NaN."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, (
            f"{path}: {a.dtype}{list(a.shape)} != {b.dtype}{list(b.shape)}"
        )
        assert a.requires_grad == b.requires_grad, f"{path}: requires_grad differs"
        assert torch.equal(a.detach(), b.detach()), f"{path}: values differ"
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        assert a.tobytes() == b.tobytes(), f"{path}: values differ"
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), f"{path}: {a!r} != {b!r}"
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), f"{path}: keys {list(a)} != {list(b)}"
        for k in a:
            assert type(k) is type(next(x for x in b if x == k and type(x) is type(k))), f"{path}: key type of {k!r}"
            assert_same(a[k], b[k], f"{path}[{k!r}]")
        assert getattr(a, "_metadata", None) == getattr(b, "_metadata", None), f"{path}: _metadata differs"
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def run_together(
    n: int, work: Callable[..., object], *, before: Callable[[int], object] | None = None
) -> list[BaseException]:
    """Runs ``work(k)`` for k in 0..n-1, each on a thread of its own, all released at once by a barrier.

    ``before(k)``, if given, runs on thread k before the barrier (e.g. a store of its own, built outside the race)
    and its result is passed as ``work``'s second argument. Returns what the threads raised (every thread is joined
    first): a failing ``before`` breaks the barrier, so the others end too.
    """
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def run(k: int) -> None:
        try:
            prepared = None if before is None else before(k)
        except BaseException as exc:  # reported by the caller; the others are released at once
            start.abort()
            errors.append(exc)
            return
        try:
            start.wait()
            if before is None:
                work(k)
            else:
                work(k, prepared)
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


#: Worker processes fork from a server that has torch and bucketsnap imported (benchmarks/campaign_common.py's
#: way): a worker starts in milliseconds, where a new interpreter spends seconds importing torch.
FORKSERVER = multiprocessing.get_context("forkserver")
FORKSERVER.set_forkserver_preload(["torch", "torch.distributed", "bucketsnap"])


def _run_script(script: str, argv: Sequence[str], stdout: str, stderr: str) -> None:
    """In the forked process: ``script`` run as ``python script *argv`` runs it, its output to the files."""
    for fd, path in ((1, stdout), (2, stderr)):
        file = os.open(path, os.O_WRONLY | os.O_APPEND)  # created by the parent, so that it can be read at once
        os.dup2(file, fd)
        os.close(file)
    sys.path.insert(0, str(Path(script).parent))
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")


class Worker:
    """A worker script in a forked process, waited for, signalled and killed as a ``subprocess.Popen`` is."""

    def __init__(self, script: str, argv: Sequence[str], stdout: Path, stderr: Path) -> None:
        self.args = [script, *argv]
        stdout.write_bytes(b"")
        stderr.write_bytes(b"")
        self._process = FORKSERVER.Process(target=_run_script, args=(script, list(argv), str(stdout), str(stderr)))
        self._process.start()
        self.pid: int = self._process.pid

    @property
    def returncode(self) -> int | None:
        """The exit status, or minus the signal that ended it (as Popen's); None while it runs."""
        code: int | None = self._process.exitcode
        return code

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self.returncode is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self._process.kill()


class TcpProxy:
    """A TCP proxy on 127.0.0.1:<port> to ``target``: each connection accepted is handed to :meth:`admit`, then,
    with a connection of its own to ``target``, to :meth:`serve`, which decides what goes through."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def admit(self, client: socket.socket) -> bool:
        """Whether to forward ``client`` (a subclass may close it instead)."""
        return True

    def serve(self, client: socket.socket, upstream: socket.socket) -> None:
        """Start forwarding between ``client`` and ``upstream`` (on threads of its own; must not block)."""
        raise NotImplementedError

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            if self.admit(client):
                self.serve(client, socket.create_connection(self.target))
