"""S3 test servers on 127.0.0.1: LocalStack (from its own virtualenv) or moto's server, or an external endpoint.

Which one :func:`s3_server` starts, in order: the endpoint in ``BUCKETSNAP_TEST_S3_ENDPOINT`` (started by
someone else, used as is); LocalStack when its virtualenv is there (``BUCKETSNAP_LOCALSTACK_VENV``, else
``.venv-localstack`` in the project root); moto's server otherwise (``moto[server]`` comes with
``bucketsnap[testing]``). LocalStack is the closer emulation of AWS S3 and the one bucketsnap's own suite runs
on; moto needs nothing beyond the extra and starts in under a second. Both refuse a second ``If-None-Match: *``
create, which the commit protocol relies on.

LocalStack lives in a virtualenv of its own because it pins an older botocore than s3fs needs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from bucketsnap.testing._process import (
    STARTUP_TIMEOUT,
    ChildServer,
    Endpoint,
    free_port,
    http_get,
    project_root,
    unique_bucket_name,
)

__all__ = [
    "CATALOG_CACHE_DIR",
    "LOCALSTACK_VENV_ENV",
    "S3_ENDPOINT_ENV",
    "S3_SERVER_KINDS",
    "LocalStackServer",
    "MotoServer",
    "S3Server",
    "describe_s3_server",
    "localstack_venv",
    "s3_env",
    "s3_server",
    "s3_storage_options",
]

S3_ENDPOINT_ENV = "BUCKETSNAP_TEST_S3_ENDPOINT"
LOCALSTACK_VENV_ENV = "BUCKETSNAP_LOCALSTACK_VENV"
CATALOG_CACHE_DIR = "bucketsnap-service-catalog"  # inside the LocalStack venv (localstack/setup.sh fills it)
#: What ``kind`` :func:`s3_server` takes: "auto" picks LocalStack when its virtualenv is there, else moto.
S3_SERVER_KINDS = ("auto", "localstack", "moto")


class S3Server(Endpoint):
    """An S3 endpoint. Used as-is for an external endpoint: start/stop do nothing and
    reset() only deletes buckets created through create_bucket()."""

    owns_all_buckets = False
    kind = "external endpoint"

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
    """``BUCKETSNAP_LOCALSTACK_VENV``, else ``.venv-localstack`` in the project root."""
    return Path(os.environ.get(LOCALSTACK_VENV_ENV) or project_root() / ".venv-localstack")


def _environment_without_python_paths() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


class LocalStackServer(ChildServer, S3Server):
    """LocalStack (S3 only) as a host process from the LocalStack venv."""

    owns_all_buckets = True
    kind = "LocalStack"

    def __init__(self, venv: Path | None = None, timeout: float = STARTUP_TIMEOUT) -> None:
        super().__init__()
        self.venv = venv or localstack_venv()
        self.timeout = timeout
        self.port = 0
        self.workdir = None
        self._process = None

    def start(self) -> None:
        if self._process is not None:
            return
        python = self.venv / "bin" / "python"
        if not python.exists():
            raise RuntimeError(
                f"LocalStack venv not found at {self.venv}; create it as docs/testing.md says (in bucketsnap's "
                f"repository: localstack/setup.sh), or set {LOCALSTACK_VENV_ENV}, or {S3_ENDPOINT_ENV} for an "
                "external S3"
            )
        self.workdir = Path(tempfile.mkdtemp(prefix="bucketsnap-localstack-"))
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        env = _environment_without_python_paths()
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
        argv = [str(python), "-m", "localstack.runtime.main"]
        self._launch("localstack", argv, self._ready, self.timeout, env, prepare=self._link_service_catalog)
        self._save_service_catalog()

    # LocalStack builds a service-catalog index (~3 s) into a fresh FILESYSTEM_ROOT on
    # every start unless one is found in <root>/usr/lib/localstack (how the Docker image
    # ships it). Keep it in the venv (setup.sh prebuilds it; else the first start saves it) and link it in.
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
        body = http_get(f"{self.endpoint_url}/_localstack/health")
        if body is None:
            return False
        try:
            state = json.loads(body).get("services", {}).get("s3")
        except (ValueError, AttributeError):
            return False
        return state in ("available", "running")


class MotoServer(ChildServer, S3Server):
    """moto's standalone server (``python -m moto.server``, from ``moto[server]``) as a subprocess of this
    interpreter, in memory."""

    owns_all_buckets = True
    kind = "moto"

    def __init__(self, timeout: float = STARTUP_TIMEOUT) -> None:
        super().__init__()
        self.timeout = timeout
        self.port = 0
        self.workdir = None
        self._process = None

    def start(self) -> None:
        if self._process is not None:
            return
        # Looked up, not imported: moto and its dependencies stay out of the test process (the server's log
        # says which of the [server] extra's dependencies is missing, if one is).
        if importlib.util.find_spec("moto") is None:
            raise RuntimeError(
                "moto is not installed: pip install 'bucketsnap[testing]' (moto[server]), or create a LocalStack "
                f"venv (docs/testing.md), or set {S3_ENDPOINT_ENV}"
            )
        self.workdir = Path(tempfile.mkdtemp(prefix="bucketsnap-moto-"))
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        url = f"{self.endpoint_url}/moto-api/data.json"
        self._launch("moto", argv, lambda: http_get(url) is not None, self.timeout, _environment_without_python_paths())


def _choose(kind: str) -> str:
    """The server :func:`s3_server` starts for ``kind``: "external", "localstack" or "moto"."""
    if kind not in S3_SERVER_KINDS:
        raise ValueError(f"the S3 test server is one of {', '.join(S3_SERVER_KINDS)}, not {kind!r}")
    if os.environ.get(S3_ENDPOINT_ENV):
        return "external"
    if kind != "auto":
        return kind
    # A venv named explicitly must be there (a typo should fail, not quietly test against moto).
    found = bool(os.environ.get(LOCALSTACK_VENV_ENV)) or (localstack_venv() / "bin" / "python").exists()
    return "localstack" if found else "moto"


def describe_s3_server(kind: str = "auto") -> str:
    """What :func:`s3_server` would start, in words (for pytest's header); starts nothing."""
    choice = _choose(kind)
    descriptions = {
        "external": lambda: f"the endpoint in {S3_ENDPOINT_ENV} ({os.environ.get(S3_ENDPOINT_ENV)})",
        "localstack": lambda: f"LocalStack from {localstack_venv()}",
        "moto": lambda: f"moto's server (no LocalStack venv at {localstack_venv()})",
    }
    return descriptions[choice]()


def s3_server(kind: str = "auto") -> S3Server:
    """A started S3 server: BUCKETSNAP_TEST_S3_ENDPOINT if set, else LocalStack or moto (see the module)."""
    choice = _choose(kind)
    if choice == "external":
        return S3Server(
            endpoint_url=os.environ[S3_ENDPOINT_ENV],
            key=os.environ.get("AWS_ACCESS_KEY_ID", "test"),
            secret=os.environ.get("AWS_SECRET_ACCESS_KEY", "test"),
            region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        )
    server: S3Server = LocalStackServer() if choice == "localstack" else MotoServer()
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


def s3_env(server: S3Server) -> dict[str, str]:
    """Environment variables that point an unconfigured s3fs/boto3 client at ``server`` (botocore reads
    ``AWS_ENDPOINT_URL_S3``; with an endpoint of an IP address it addresses buckets by path)."""
    return {
        "AWS_ENDPOINT_URL_S3": server.endpoint_url,
        "AWS_ACCESS_KEY_ID": server.key,
        "AWS_SECRET_ACCESS_KEY": server.secret,
        "AWS_DEFAULT_REGION": server.region,
    }
