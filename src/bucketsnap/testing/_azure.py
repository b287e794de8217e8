"""An Azure Blob Storage test server on 127.0.0.1: Azurite's blob service, or an external account in
``BUCKETSNAP_TEST_AZURE_CONNECTION_STRING``.

Azurite is a Node.js package, not a Python one, so ``pip`` cannot install it. :func:`azurite_blob_binary`
looks for its ``azurite-blob`` launcher, in order: under ``BUCKETSNAP_AZURITE_DIR`` (an npm prefix), in the
project root's ``.azurite/`` (``npm install --prefix .azurite azurite@3.35.0``, what bucketsnap's
``scripts/setup.sh dev`` does) or ``node_modules/`` (``npm install azurite@3.35.0``), then on ``PATH``
(``npm install -g azurite@3.35.0``). 3.35.0 is the newest release that runs on Node.js 20.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bucketsnap.testing._process import (
    STARTUP_TIMEOUT,
    ChildServer,
    Endpoint,
    free_port,
    http_server_header,
    project_root,
    unique_bucket_name,
)

__all__ = [
    "AZURE_CONNECTION_STRING_ENV",
    "AZURITE_ACCOUNT",
    "AZURITE_DIR_ENV",
    "AZURITE_KEY",
    "AZURITE_VERSION",
    "AzureServer",
    "AzuriteServer",
    "azure_env",
    "azure_server",
    "azure_storage_options",
    "azurite_blob_binary",
    "azurite_dir",
    "describe_azure_server",
]

AZURE_CONNECTION_STRING_ENV = "BUCKETSNAP_TEST_AZURE_CONNECTION_STRING"
AZURITE_DIR_ENV = "BUCKETSNAP_AZURITE_DIR"
AZURITE_VERSION = "3.35.0"
# Azurite's one built-in account and its published key (the same in every Azurite install).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
_LAUNCHER = Path("node_modules") / ".bin" / "azurite-blob"


def _parse_connection_string(conn: str) -> dict[str, str]:
    parts = (item.partition("=") for item in conn.split(";") if item.strip())
    return {key.strip(): value.strip() for key, _, value in parts}


class AzureServer(Endpoint):
    """An Azure Blob Storage account, reached through a connection string. Used as-is for an
    external account: start/stop do nothing and reset() only deletes containers made by
    create_container()."""

    owns_all_containers = False
    kind = "external account"

    def __init__(self, connection_string: str = "") -> None:
        self.connection_string = connection_string
        self.startup_seconds = 0.0
        self.created_containers: set[str] = set()

    @property
    def account_name(self) -> str:
        return _parse_connection_string(self.connection_string).get("AccountName", "")

    @property
    def account_key(self) -> str:
        return _parse_connection_string(self.connection_string).get("AccountKey", "")

    @property
    def blob_endpoint(self) -> str:
        return _parse_connection_string(self.connection_string).get("BlobEndpoint", "")

    def client(self) -> Any:
        """A synchronous azure-storage-blob BlobServiceClient for this account (few, short retries)."""
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(
            self.connection_string, retry_total=2, initial_backoff=0.5, increment_base=2
        )

    def create_container(self, name: str | None = None) -> str:
        """Create a container (3-63 lowercase letters, digits and dashes); errors are raised, never
        swallowed (adlfs's mkdir() turns a failure into a warning)."""
        name = name or unique_bucket_name()
        with self.client() as client:
            client.create_container(name)
        self.created_containers.add(name)
        return name

    def reset(self) -> None:
        """Delete containers (all of them on a server we own) with their blobs."""
        from azure.core.exceptions import ResourceNotFoundError

        with self.client() as client:
            if self.owns_all_containers:
                names = {c.name for c in client.list_containers()}
            else:
                names = set(self.created_containers)
            for name in sorted(names):
                with contextlib.suppress(ResourceNotFoundError):
                    client.delete_container(name)
        self.created_containers.clear()


def azurite_dir() -> Path:
    """``BUCKETSNAP_AZURITE_DIR``, else ``.azurite`` in the project root (an npm prefix)."""
    return Path(os.environ.get(AZURITE_DIR_ENV) or project_root() / ".azurite")


def _azurite_candidates() -> list[Path]:
    if os.environ.get(AZURITE_DIR_ENV):  # named explicitly: only there
        return [azurite_dir() / _LAUNCHER]
    found = [azurite_dir() / _LAUNCHER, project_root() / _LAUNCHER]
    on_path = shutil.which("azurite-blob")
    return [*found, Path(on_path)] if on_path else found


def azurite_blob_binary() -> Path:
    """The ``azurite-blob`` launcher (see the module docstring for where it is looked for)."""
    candidates = _azurite_candidates()
    for path in candidates:
        if path.exists():
            return path
    raise RuntimeError(
        f"Azurite not found (looked for {', '.join(map(str, candidates))}, and azurite-blob on PATH): install it "
        f"with npm (Node.js >= 20): npm install --prefix .azurite azurite@{AZURITE_VERSION} in the project root, "
        f"or set {AZURITE_DIR_ENV} to an npm prefix holding it, or {AZURE_CONNECTION_STRING_ENV} for an "
        "external account"
    )


class AzuriteServer(ChildServer, AzureServer):
    """Azurite's blob service (no queue or table service) as a subprocess, data in a temporary folder.

    --skipApiVersionCheck: azure-storage-blob sends a newer x-ms-version than Azurite knows and
    Azurite refuses it otherwise (400 InvalidHeaderValue). --disableTelemetry: no usage reports.
    --silent: no access log; startup lines and errors still go to the log file.
    """

    owns_all_containers = True
    kind = "Azurite"

    def __init__(self, timeout: float = STARTUP_TIMEOUT, port: int = 0, extra_args: Sequence[str] = ()) -> None:
        super().__init__()
        self.timeout = timeout
        self.requested_port = port
        self.extra_args = list(extra_args)
        self.port = 0
        self.endpoint_url = ""
        self.workdir = None
        self._process = None

    def start(self) -> None:
        if self._process is not None:
            return
        binary = azurite_blob_binary()
        self.workdir = Path(tempfile.mkdtemp(prefix="bucketsnap-azurite-"))
        data = self.workdir / "data"
        data.mkdir()
        self.port = self.requested_port or free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}/{AZURITE_ACCOUNT}"
        self.connection_string = (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
            f"BlobEndpoint={self.endpoint_url};"
        )
        argv = [
            str(binary),
            "--blobHost", "127.0.0.1",
            "--blobPort", str(self.port),
            "--location", str(data),
            "--silent",
            "--skipApiVersionCheck",
            "--disableTelemetry",
            *self.extra_args,
        ]  # fmt: skip
        # AZURITE_ACCOUNTS would replace devstoreaccount1's key; AZURITE_DB would move the metadata.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AZURITE_")}
        url = f"{self.endpoint_url}?comp=list"  # answers 403 without a signature: that is enough
        ready = lambda: (http_server_header(url) or "").startswith("Azurite-Blob")  # noqa: E731
        self._launch("azurite", argv, ready, self.timeout, env)


def describe_azure_server() -> str:
    """What :func:`azure_server` would start, in words; starts nothing."""
    if os.environ.get(AZURE_CONNECTION_STRING_ENV):
        return f"the account in {AZURE_CONNECTION_STRING_ENV}"
    found = [path for path in _azurite_candidates() if path.exists()]
    return f"Azurite from {found[0]}" if found else "Azurite (not installed: see docs/testing.md)"


def azure_server() -> AzureServer:
    """A started Azure Blob server: BUCKETSNAP_TEST_AZURE_CONNECTION_STRING if set, else Azurite."""
    conn = os.environ.get(AZURE_CONNECTION_STRING_ENV)
    if conn:
        return AzureServer(connection_string=conn)
    server = AzuriteServer()
    server.start()
    return server


def azure_storage_options(server: AzureServer) -> dict[str, Any]:
    """Keyword arguments for adlfs.AzureBlobFileSystem / fsspec storage_options (az:// and abfs://).

    The connection string carries the http endpoint: adlfs's account_host option always means https.
    """
    return {
        "account_name": server.account_name,
        "account_key": server.account_key,
        "connection_string": server.connection_string,
    }


def azure_env(server: AzureServer) -> dict[str, str]:
    """Environment variables that point an unconfigured adlfs at ``server`` (it reads this one)."""
    return {"AZURE_STORAGE_CONNECTION_STRING": server.connection_string}
