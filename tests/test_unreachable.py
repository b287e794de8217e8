"""Stores that cannot be used fail fast, in one line saying why and what to do (issue 16).

Against the real test servers (LocalStack, fake-gcs-server, Azurite; moto with IAM checks for credentials S3
refuses): a stopped server, a wrong port, an endpoint that accepts connections and never answers, one that
never accepts them, a host name that does not resolve, no credentials, refused credentials, a missing bucket.
Each is checked through the Python API (the StorageError subclass, its message, how long it took) and through
the console script (one line on stderr, the exit code docs/cli.md gives).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import servers
from bucketsnap import Retry, SnapshotStore, StorageError
from bucketsnap._cli import EXIT_FAILURE, EXIT_NOT_FOUND
from bucketsnap._storage import BucketNotFoundError, CredentialsError, Storage, UnreachableError
from conftest import Backend

SCRIPT = Path(sys.executable).parent / "bucketsnap"
#: The connect timeout of these tests: each failure must come within it, plus the diagnosis (2 s at most).
TIMEOUT = 3.0
SLACK = 10.0  # generous: a loaded 2-core CI machine; what it guards against took 34-189 s
SECRET = "PLANTED-s3cr3t-4c3b2a"
SERVERS = ["s3", "gcs", "azure"]


def with_endpoint(backend: Backend, endpoint: str) -> dict[str, Any]:
    """``backend``'s storage options, pointed at ``endpoint`` (``http://host:port``) instead of its server."""
    options = dict(backend.options)
    if backend.name == "s3":
        options["client_kwargs"] = {**options["client_kwargs"], "endpoint_url": endpoint}
    elif backend.name == "gcs":
        options["endpoint_url"] = endpoint
    else:
        old = re.search(r"BlobEndpoint=(http://[^/;]+)", options["connection_string"])
        assert old is not None
        options["connection_string"] = options["connection_string"].replace(old.group(1), endpoint)
    return options


def cli_args(backend: Backend, options: dict[str, Any]) -> list[str]:
    """``options`` as the console script's options."""
    if backend.name == "s3":
        client = options["client_kwargs"]
        return [
            "--endpoint-url",
            client["endpoint_url"],
            "-s",
            f"key={options['key']}",
            "-s",
            f"secret={options['secret']}",
            "-s",
            f"client_kwargs.region_name={client['region_name']}",
            "-s",
            "config_kwargs.s3.addressing_style=path",
        ]
    if backend.name == "gcs":
        return ["--endpoint-url", options["endpoint_url"], "-s", f"token={options['token']}"]
    return ["-s", f"connection_string={options['connection_string']}"]


def clean_environment(tmp_path: Path) -> dict[str, str]:
    """The environment without any store credentials, with a home of its own (no gcloud or AWS config)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "GOOGLE_", "AZURE_", "BUCKETSNAP_"))}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env.update(HOME=str(home), CLOUDSDK_CONFIG=str(home / "gcloud"), AWS_EC2_METADATA_DISABLED="true")
    return env


def script(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, float]:
    """Run the console script; its exit code, stderr and the seconds it took."""
    start = time.monotonic()
    done = subprocess.run(
        [str(SCRIPT), *args, "--connect-timeout", str(TIMEOUT)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    return done.returncode, done.stderr, time.monotonic() - start


def assert_one_line(stderr: str, *words: str) -> None:
    assert stderr.count("\n") == 1 and stderr.startswith("bucketsnap: error: "), stderr
    for word in words:
        assert word in stderr, (word, stderr)
    assert "Traceback" not in stderr and SECRET not in stderr


def fails_fast(storage: Storage, error: type[StorageError], *words: str) -> StorageError:
    """The error of ``storage``'s first request, which must come within the connect timeout."""
    start = time.monotonic()
    with pytest.raises(error) as caught:
        storage.list("manifest")
    elapsed = time.monotonic() - start
    message = str(caught.value)
    assert elapsed < TIMEOUT + SLACK, (elapsed, message)
    assert "\n" not in message and message.startswith(storage.url), message
    for word in words:
        assert word in message, (word, message)
    return caught.value


@pytest.fixture(params=SERVERS)
def server_backend(request: pytest.FixtureRequest) -> Backend:
    request.applymarker(getattr(pytest.mark, request.param))
    return request.getfixturevalue(f"{request.param}_backend")  # type: ignore[no-any-return]


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """An endpoint that accepts connections and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def unanswered_endpoint() -> Iterator[str]:
    """An endpoint whose connections never complete: its accept queue is full, so Linux drops new SYNs."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(0)
        address = sock.getsockname()
        fillers = []
        try:
            for _ in range(4):
                filler = socket.socket()
                filler.setblocking(False)
                fillers.append(filler)
                with contextlib.suppress(BlockingIOError):
                    filler.connect(address)
            yield f"http://{address[0]}:{address[1]}"
        finally:
            for filler in fillers:
                filler.close()


# -- servers that cannot be reached ----------------------------------------------------------------------


def test_a_wrong_port_is_unreachable_at_once(server_backend: Backend, tmp_path: Path) -> None:
    """An explicit endpoint where nothing listens fails once it has refused connections for 2 s (a server that is
    starting opens its port by then), not after the connect timeout and the store client's own retries: a
    refused local S3 server took 13 s to report."""
    server_backend.store().itrs()  # the real server has answered about this bucket: another endpoint is another store
    options = with_endpoint(server_backend, f"http://127.0.0.1:{servers.free_port()}")
    url = server_backend.url()
    storage = Storage(url, storage_options=options, retry=Retry(connect_timeout=120))
    with pytest.raises(UnreachableError, match=r"refused the connection \(nothing listens there\)") as caught:
        storage.list("manifest")
    message = str(caught.value)
    assert "\n" not in message and message.startswith(url)
    took = re.search(r"\((?:refused|failed) \d+ times in (\d+\.\d) s\)", message)
    assert took is not None and float(took.group(1)) < 60, message  # as the error itself counts it

    code, stderr, seconds = script("ls", url, *cli_args(server_backend, options))
    assert code == EXIT_FAILURE and seconds < TIMEOUT + SLACK + 2, (seconds, stderr)
    assert_one_line(stderr, "refused the connection", "server is running")


def test_an_endpoint_that_never_answers_is_unreachable_within_the_timeout(
    server_backend: Backend, silent_endpoint: str
) -> None:
    storage = Storage(
        server_backend.url(),
        storage_options=with_endpoint(server_backend, silent_endpoint),
        retry=Retry(connect_timeout=TIMEOUT),
    )
    fails_fast(storage, UnreachableError, f"sent no answer within {TIMEOUT:g} s")


def test_an_endpoint_that_never_accepts_a_connection_is_unreachable(
    server_backend: Backend, unanswered_endpoint: str
) -> None:
    storage = Storage(
        server_backend.url(),
        storage_options=with_endpoint(server_backend, unanswered_endpoint),
        retry=Retry(connect_timeout=TIMEOUT),
    )
    fails_fast(storage, UnreachableError, "did not accept a connection")


@pytest.mark.parametrize("name", ["s3", "gcs"])  # an Azure endpoint is a connection string's
def test_a_host_name_that_does_not_resolve(name: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    request.applymarker(getattr(pytest.mark, name))
    backend: Backend = request.getfixturevalue(f"{name}_backend")
    options = with_endpoint(backend, "http://no-such-host.invalid:9000")
    storage = Storage(backend.url(), storage_options=options, retry=Retry(connect_timeout=TIMEOUT))
    fails_fast(storage, UnreachableError, "no-such-host.invalid does not resolve")


@pytest.mark.gcs
def test_a_stopped_gcs_server(tmp_path: Path) -> None:
    server = servers.FakeGcsServer()
    server.start()
    bucket = server.create_bucket()
    options = servers.gcs_storage_options(server)
    store = SnapshotStore(f"gs://{bucket}/run", storage_options=options, retry=Retry(connect_timeout=TIMEOUT))
    store.save(1, {"step": 1})
    server.stop()
    # Another bucket: this process has had an answer about this one, so its errors are retried as transient.
    again = Storage(f"gs://{bucket}-2/run", storage_options=options, retry=Retry(connect_timeout=TIMEOUT))
    fails_fast(again, UnreachableError, "refused the connection")
    code, stderr, _ = script("ls", f"gs://{bucket}/run", "--endpoint-url", options["endpoint_url"], "-s", "token=anon")
    assert code == EXIT_FAILURE
    assert_one_line(stderr, "cannot reach the GCS server", "refused the connection")


@pytest.mark.azure
def test_a_stopped_azure_server() -> None:
    server = servers.AzuriteServer()
    server.start()
    container = server.create_container()
    options = servers.azure_storage_options(server)
    server.stop()
    storage = Storage(f"az://{container}/run", storage_options=options, retry=Retry(connect_timeout=TIMEOUT))
    fails_fast(storage, UnreachableError, "refused the connection")


# -- credentials -----------------------------------------------------------------------------------------


@pytest.mark.s3
def test_s3_without_credentials_says_where_they_come_from(s3_backend: Backend, tmp_path: Path) -> None:
    client = s3_backend.options["client_kwargs"]
    code, stderr, seconds = script(
        "ls",
        s3_backend.url(),
        "--endpoint-url",
        client["endpoint_url"],
        "-s",
        "config_kwargs.s3.addressing_style=path",
        env=clean_environment(tmp_path),
    )
    assert code == EXIT_FAILURE and seconds < TIMEOUT + SLACK, (seconds, stderr)
    assert_one_line(stderr, "no S3 credentials", "AWS_ACCESS_KEY_ID", "anon=true")


@pytest.fixture(scope="module")
def checking_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's server with IAM checks on (INITIAL_NO_AUTH_ACTION_COUNT=0): keys it does not know are refused."""
    port = servers.free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=2).close()
                break
            except OSError:
                assert process.poll() is None, f"moto exited: {log.read_text()[-2000:]}"
                assert time.monotonic() < deadline, f"moto did not start in 60 s: {log.read_text()[-2000:]}"
                time.sleep(0.1)
        yield endpoint
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.s3
def test_s3_credentials_the_server_refuses(checking_s3: str, tmp_path: Path) -> None:
    options = {
        "key": "AKIAIOSFODNN7EXAMPLE",
        "secret": SECRET,
        "client_kwargs": {"endpoint_url": checking_s3, "region_name": "us-east-1"},
        "config_kwargs": {"s3": {"addressing_style": "path"}},
    }
    storage = Storage("s3://some-bucket/run", storage_options=options, retry=Retry(connect_timeout=TIMEOUT))
    fails_fast(storage, CredentialsError, "refused the credentials (InvalidAccessKeyId)", "AWS_SECRET_ACCESS_KEY")
    env = {**clean_environment(tmp_path), "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE", "AWS_SECRET_ACCESS_KEY": SECRET}
    code, stderr, _ = script("ls", "s3://some-bucket/run", "--endpoint-url", checking_s3, env=env)
    assert code == EXIT_FAILURE
    assert_one_line(stderr, "InvalidAccessKeyId")


@pytest.mark.azure
def test_an_azure_account_key_the_server_refuses(azure_backend: Backend) -> None:
    options = dict(azure_backend.options)
    wrong = "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXktd3Jvbmc="
    options["connection_string"] = options["connection_string"].replace(options["account_key"], wrong)
    options["account_key"] = wrong
    storage = Storage(azure_backend.url(), storage_options=options, retry=Retry(connect_timeout=TIMEOUT))
    fails_fast(storage, CredentialsError, "refused the credentials (AuthenticationFailed)", "account_key")
    code, stderr, _ = script("ls", azure_backend.url(), *cli_args(azure_backend, options))
    assert code == EXIT_FAILURE
    assert_one_line(stderr, "AuthenticationFailed")
    assert wrong not in stderr


@pytest.mark.azure
def test_azure_without_credentials(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match="connection_string") as caught:
        Storage("az://container/run")
    assert "install" not in str(caught.value)
    code, stderr, _ = script("ls", "az://container/run", env=clean_environment(tmp_path))
    assert code == EXIT_FAILURE
    assert_one_line(stderr, "account_name", "connection_string")


@pytest.mark.gcs
def test_gcs_credentials_named_but_unusable(gcs_backend: Backend, tmp_path: Path) -> None:
    env = {**clean_environment(tmp_path), "GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "missing.json")}
    endpoint = ["--endpoint-url", gcs_backend.options["endpoint_url"]]
    code, stderr, seconds = script("ls", gcs_backend.url(), *endpoint, env=env)
    assert code == EXIT_FAILURE and seconds < TIMEOUT + SLACK, (seconds, stderr)
    assert_one_line(stderr, "no GCS credentials", "GOOGLE_APPLICATION_CREDENTIALS=", "missing.json")


@pytest.mark.gcs
def test_gcs_without_credentials_goes_anonymous_without_waiting_for_the_metadata_server(
    gcs_backend: Backend, tmp_path: Path
) -> None:
    """gcsfs asks the GCE metadata server for 15 s before it falls back to anonymous requests; the emulator
    answers anonymous ones, so the run is found missing (exit 3) at once. (The metadata server is pointed at a
    closed port, so that the test does not depend on how this machine's network answers 169.254.169.254.)"""
    closed = f"127.0.0.1:{servers.free_port()}"
    env = {**clean_environment(tmp_path), "GCE_METADATA_IP": closed, "GCE_METADATA_HOST": closed}
    endpoint = ["--endpoint-url", gcs_backend.options["endpoint_url"]]
    code, stderr, seconds = script("ls", gcs_backend.url(), *endpoint, env=env)
    assert code == EXIT_NOT_FOUND and seconds < 8, (seconds, stderr)
    assert_one_line(stderr, "no bucketsnap run at")


# -- missing buckets ---------------------------------------------------------------------------------------


def test_a_missing_bucket_is_named(server_backend: Backend) -> None:
    base = server_backend.base.split("://")[0]
    missing = f"{base}://bucketsnap-missing-{os.getpid()}/run"
    storage = Storage(missing, storage_options=server_backend.options, retry=Retry(connect_timeout=TIMEOUT))
    word = "container" if server_backend.name == "azure" else "bucket"
    fails_fast(storage, BucketNotFoundError, f"the {word} 'bucketsnap-missing-{os.getpid()}' does not exist")
    store = SnapshotStore(missing, storage_options=server_backend.options)
    with pytest.raises(BucketNotFoundError):
        store.save(1, {"step": 1})
    code, stderr, _ = script("ls", missing, *cli_args(server_backend, server_backend.options))
    assert code == EXIT_NOT_FOUND
    assert_one_line(stderr, "does not exist", f"create the {word}")


# -- what stays as it was ----------------------------------------------------------------------------------


def test_a_store_that_answered_is_not_asked_again(server_backend: Backend) -> None:
    store = server_backend.store(retry=Retry(connect_timeout=TIMEOUT))
    store.save(1, {"step": 1})
    calls: list[str] = []
    backend = store.storage.backend
    original = backend.reach

    def counting(path: str, *, timeout: float) -> Any:
        calls.append(path)
        return original(path, timeout=timeout)

    backend.reach = counting  # type: ignore[method-assign]
    again = server_backend.store()  # another run in the same bucket: already reached
    again.storage.backend.reach = counting  # type: ignore[method-assign]
    assert store.itrs() == [1] and again.itrs() == []
    assert calls == []


def test_retry_rejects_a_policy_that_cannot_try() -> None:
    with pytest.raises(ValueError, match="attempts"):
        Retry(attempts=0)
    with pytest.raises(ValueError, match="connect_timeout"):
        Retry(connect_timeout=0)
