"""What every test server shares: a subprocess in its own process group with its output in a log file, free
ports on 127.0.0.1, and where a project keeps the servers that are not Python packages.

A server that does not answer within its timeout is stopped and raises ``RuntimeError`` with the tail of its
log, so a test that needs it fails with the reason instead of being skipped. A server is stopped with SIGTERM,
then SIGKILL, of its whole process group; on Linux it is also killed if the process that started it dies
(``PR_SET_PDEATHSIG``), so a test session killed with SIGKILL leaves no server behind either.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

__all__ = [
    "LOG_TAIL_LINES",
    "STARTUP_TIMEOUT",
    "ServerProcess",
    "free_port",
    "http_get",
    "http_server_header",
    "project_root",
    "set_project_root",
    "unique_bucket_name",
]

STARTUP_TIMEOUT = 60.0
LOG_TAIL_LINES = 100

_project_root: Path | None = None


def set_project_root(path: str | os.PathLike[str] | None) -> Path | None:
    """Set where ``.venv-localstack`` and ``.azurite`` are looked for (the pytest plugin sets pytest's rootdir;
    None: the current directory); returns the previous setting."""
    global _project_root
    previous, _project_root = _project_root, None if path is None else Path(path)
    return previous


def project_root() -> Path:
    """The folder set by :func:`set_project_root`, else the current directory."""
    return _project_root if _project_root is not None else Path.cwd()


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (racy by nature, good enough for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def unique_bucket_name(prefix: str = "bucketsnap-test") -> str:
    """A DNS-safe bucket name, unique per call."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def http_get(url: str, timeout: float = 2.0) -> bytes | None:
    """Body of a 200 response, or None on any connection/HTTP error."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.read() if resp.status == 200 else None  # type: ignore[no-any-return]
    except (OSError, http.client.HTTPException):
        return None


def http_server_header(url: str, timeout: float = 2.0) -> str | None:
    """The Server header of any HTTP response (error statuses included), or None if nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return str(resp.headers.get("Server", ""))
    except urllib.error.HTTPError as exc:
        return str(exc.headers.get("Server", ""))
    except (OSError, http.client.HTTPException):
        return None


def _find_prctl() -> Callable[[int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_prctl = _find_prctl()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child, before exec
    """SIGKILL this process when the thread that started it exits: a killed test session leaves no server."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class ServerProcess:
    """A server subprocess in its own process group, output to ``<workdir>/<name>.log``."""

    def __init__(self, name: str, workdir: Path) -> None:
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        with open(self.log_path, "wb") as log:  # the child keeps its own copy of the fd
            self.proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                start_new_session=True,
                preexec_fn=_die_with_parent if _prctl is not None else None,
            )

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            with open(self.log_path, errors="replace") as fh:
                return "".join(deque(fh, maxlen=lines))
        except OSError as exc:
            return f"<no log: {exc}>"

    def wait_ready(self, probe: Callable[[], bool], timeout: float) -> float:
        """Poll ``probe`` until true; returns seconds waited. Raises RuntimeError with the log's tail."""
        assert self.proc is not None
        start = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                reason = f"exited with code {self.proc.returncode}"
                break
            if probe():
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                reason = f"not ready after {timeout:.0f}s"
                break
            time.sleep(0.05)
        tail = self.log_tail()
        self.stop()
        raise RuntimeError(f"{self.name} failed to start ({reason}); last {LOG_TAIL_LINES} log lines:\n{tail}")

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL it if still alive after ``grace`` s."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # reap stragglers left in the group after the leader exited
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


_E = TypeVar("_E", bound="Endpoint")


class Endpoint:
    """A test server as a context manager: ``start()`` on entry, ``stop()`` on exit; both do nothing for an
    endpoint someone else runs (the subclasses that start one override them)."""

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def __enter__(self: _E) -> _E:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ChildServer(Endpoint):
    """A server this process starts as a child (:class:`ServerProcess`) in a temporary ``workdir`` of its own:
    its log, its launch (stopped again, workdir removed, if it does not become ready) and its stop."""

    workdir: Path | None = None
    startup_seconds: float = 0.0
    _process: ServerProcess | None = None

    @property
    def log_path(self) -> Path | None:
        return self._process.log_path if self._process else None

    def _launch(
        self,
        name: str,
        argv: Sequence[str],
        ready: Callable[[], bool],
        timeout: float,
        env: Mapping[str, str] | None = None,
        prepare: Callable[[], None] | None = None,
    ) -> None:
        """Start ``argv`` in ``workdir`` (after ``prepare``) and wait until ``ready``; on any failure, stop."""
        assert self.workdir is not None
        self._process = ServerProcess(name, self.workdir)
        try:
            if prepare is not None:
                prepare()
            self._process.start(argv, env)
            self.startup_seconds = self._process.wait_ready(ready, timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop()
            self._process = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
