"""bucketsnap's pytest plugin (the ``pytest11`` entry point ``bucketsnap`` of ``bucketsnap[testing]``).

Fixtures: one per backend giving a fresh, empty :class:`~bucketsnap.testing.Run` (``bucketsnap_memory_run``,
``bucketsnap_local_run``, ``bucketsnap_s3_run``, ``bucketsnap_gcs_run``, ``bucketsnap_azure_run``), the
parametrized ``bucketsnap_run`` (each test once per backend of ``--bucketsnap-backends``, or the
``bucketsnap_backends`` ini value; ``memory,s3`` by default), and the session's servers
(``bucketsnap_s3_server``, ``bucketsnap_gcs_server``, ``bucketsnap_azure_server``).

A server starts the first time a test needs it, once per session, on a free port of 127.0.0.1, and stops at
the session's end. Each server backend has one bucket (container) per session and each run its own prefix
in it, so no test sees another's objects and nothing has to be reset between tests; on an external endpoint
(``BUCKETSNAP_TEST_S3_ENDPOINT``...) that bucket is deleted at the session's end. A server that cannot
start fails every test that needs it, with the tail of its log; none is ever skipped. A memory run's objects
are deleted after its test (``MemoryFileSystem.store`` is one dict for the whole process).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from bucketsnap.testing._azure import (
    AzureServer,
    azure_env,
    azure_server,
    azure_storage_options,
    describe_azure_server,
)
from bucketsnap.testing._gcs import GcsServer, describe_gcs_server, gcs_env, gcs_server, gcs_storage_options
from bucketsnap.testing._process import set_project_root
from bucketsnap.testing._run import Run, fresh_name
from bucketsnap.testing._s3 import S3_SERVER_KINDS, S3Server, describe_s3_server, s3_env, s3_server, s3_storage_options

__all__ = [
    "bucketsnap_azure_run",
    "bucketsnap_azure_server",
    "bucketsnap_gcs_run",
    "bucketsnap_gcs_server",
    "bucketsnap_local_run",
    "bucketsnap_memory_run",
    "bucketsnap_run",
    "bucketsnap_s3_run",
    "bucketsnap_s3_server",
]

#: Backend name -> the fixture that gives a run on it (what --bucketsnap-backends takes).
RUN_FIXTURES = {
    "memory": "bucketsnap_memory_run",
    "local": "bucketsnap_local_run",
    "s3": "bucketsnap_s3_run",
    "gcs": "bucketsnap_gcs_run",
    "azure": "bucketsnap_azure_run",
}
DEFAULT_BACKENDS = "memory,s3"
_T = TypeVar("_T")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("bucketsnap", "bucketsnap's test servers (bucketsnap.testing)")
    group.addoption(
        "--bucketsnap-backends",
        metavar="NAMES",
        help=f"comma-separated backends each test using bucketsnap_run runs on: {', '.join(RUN_FIXTURES)} "
        f"(default: the bucketsnap_backends ini value, else {DEFAULT_BACKENDS})",
    )
    group.addoption(
        "--bucketsnap-s3-server",
        choices=S3_SERVER_KINDS,
        help="the S3 server to start: LocalStack, moto, or auto (LocalStack when its venv is there, else moto; "
        "default: the bucketsnap_s3_server ini value, else auto)",
    )
    parser.addini("bucketsnap_backends", f"backends of bucketsnap_run (default {DEFAULT_BACKENDS})")
    parser.addini("bucketsnap_s3_server", "auto, localstack or moto (default auto)")


def backends(config: pytest.Config) -> list[str]:
    """The backends ``bucketsnap_run`` runs on in this session."""
    raw = config.getoption("bucketsnap_backends") or config.getini("bucketsnap_backends") or DEFAULT_BACKENDS
    names = [name.strip() for name in str(raw).split(",") if name.strip()]
    unknown = [name for name in names if name not in RUN_FIXTURES]
    if unknown or not names:
        raise pytest.UsageError(
            f"--bucketsnap-backends takes some of {', '.join(RUN_FIXTURES)}, comma-separated, not {raw!r}"
        )
    return list(dict.fromkeys(names))


def _s3_kind(config: pytest.Config) -> str:
    kind = str(config.getoption("bucketsnap_s3_server") or config.getini("bucketsnap_s3_server") or "auto")
    if kind not in S3_SERVER_KINDS:
        raise pytest.UsageError(f"bucketsnap_s3_server is one of {', '.join(S3_SERVER_KINDS)}, not {kind!r}")
    return kind


_previous_root = pytest.StashKey[Path | None]()


def pytest_configure(config: pytest.Config) -> None:
    backends(config)
    _s3_kind(config)
    # where .venv-localstack and .azurite are looked for
    config.stash[_previous_root] = set_project_root(config.rootpath)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _previous_root in config.stash:  # an inner session (pytester) hands the outer one's back
        set_project_root(config.stash[_previous_root])


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [
        f"bucketsnap: S3 server: {describe_s3_server(_s3_kind(config))}; GCS: {describe_gcs_server()}; "
        f"Azure: {describe_azure_server()}",
        f"bucketsnap: bucketsnap_run on {', '.join(backends(config))}; a server starts when a test first needs it",
    ]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "bucketsnap_run" not in metafunc.fixturenames or _parametrized_by_hand(metafunc):
        return
    names = backends(metafunc.config)
    metafunc.parametrize("bucketsnap_run", names, indirect=True, ids=names)


def _parametrized_by_hand(metafunc: pytest.Metafunc) -> bool:
    """Whether the test has its own ``@pytest.mark.parametrize("bucketsnap_run", [...], indirect=True)``."""
    for marker in metafunc.definition.iter_markers("parametrize"):
        argnames = marker.args[0] if marker.args else marker.kwargs.get("argnames", "")
        names = argnames.split(",") if isinstance(argnames, str) else list(argnames)
        if "bucketsnap_run" in (name.strip() for name in names):
            return True
    return False


def _started(what: str, start: Callable[[], _T]) -> _T:
    """``start()``, or a failure (never a skip) that says why the server is not there."""
    try:
        return start()
    except (RuntimeError, ImportError, OSError) as exc:
        pytest.fail(f"bucketsnap: the {what} test server is not available: {exc}", pytrace=False)


# -- servers, once per session -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def bucketsnap_s3_server(pytestconfig: pytest.Config) -> Iterator[S3Server]:
    """The session's S3 server (LocalStack or moto, see ``--bucketsnap-s3-server``), started on first use."""
    server = _started("S3", lambda: s3_server(_s3_kind(pytestconfig)))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def bucketsnap_gcs_server() -> Iterator[GcsServer]:
    """The session's GCS server (fake-gcs-server), started on first use."""
    server = _started("GCS", gcs_server)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def bucketsnap_azure_server() -> Iterator[AzureServer]:
    """The session's Azure Blob Storage server (Azurite), started on first use."""
    server = _started("Azure", azure_server)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def _bucketsnap_s3_bucket(bucketsnap_s3_server: S3Server) -> Iterator[str]:
    yield _started("S3", bucketsnap_s3_server.create_bucket)
    if not bucketsnap_s3_server.owns_all_buckets:  # an endpoint someone else runs: remove what we made
        bucketsnap_s3_server.reset()


@pytest.fixture(scope="session")
def _bucketsnap_gcs_bucket(bucketsnap_gcs_server: GcsServer) -> Iterator[str]:
    yield _started("GCS", bucketsnap_gcs_server.create_bucket)
    if not bucketsnap_gcs_server.owns_all_buckets:
        bucketsnap_gcs_server.reset()


@pytest.fixture(scope="session")
def _bucketsnap_azure_container(bucketsnap_azure_server: AzureServer) -> Iterator[str]:
    yield _started("Azure", bucketsnap_azure_server.create_container)
    if not bucketsnap_azure_server.owns_all_containers:
        bucketsnap_azure_server.reset()


# -- runs, one per test ----------------------------------------------------------------------------------------


@pytest.fixture
def bucketsnap_memory_run() -> Iterator[Run]:
    """A fresh ``memory://`` run; its objects (and its siblings') are deleted after the test."""
    base = f"memory://{fresh_name('bucketsnap')}"
    yield Run("memory", f"{base}/{fresh_name()}")
    _delete_everything_under(base)


@pytest.fixture
def bucketsnap_local_run(tmp_path: Any) -> Run:
    """A fresh run on local disk, in the test's ``tmp_path``."""
    return Run("local", str(tmp_path / fresh_name()))


@pytest.fixture
def bucketsnap_s3_run(bucketsnap_s3_server: S3Server, _bucketsnap_s3_bucket: str) -> Run:
    """A fresh ``s3://`` run on the session's S3 server."""
    server = bucketsnap_s3_server
    return Run("s3", f"s3://{_bucketsnap_s3_bucket}/{fresh_name()}", s3_storage_options(server), s3_env(server))


@pytest.fixture
def bucketsnap_gcs_run(bucketsnap_gcs_server: GcsServer, _bucketsnap_gcs_bucket: str) -> Run:
    """A fresh ``gs://`` run on the session's GCS server."""
    server = bucketsnap_gcs_server
    return Run("gcs", f"gs://{_bucketsnap_gcs_bucket}/{fresh_name()}", gcs_storage_options(server), gcs_env(server))


@pytest.fixture
def bucketsnap_azure_run(bucketsnap_azure_server: AzureServer, _bucketsnap_azure_container: str) -> Run:
    """A fresh ``az://`` run on the session's Azure Blob Storage server."""
    server = bucketsnap_azure_server
    url = f"az://{_bucketsnap_azure_container}/{fresh_name()}"
    return Run("azure", url, azure_storage_options(server), azure_env(server))


@pytest.fixture
def bucketsnap_run(request: pytest.FixtureRequest) -> Run:
    """A fresh run on each backend of ``--bucketsnap-backends`` in turn (the test runs once per backend)."""
    name = getattr(request, "param", None) or backends(request.config)[0]
    if name not in RUN_FIXTURES:
        raise pytest.UsageError(f"bucketsnap_run is parametrized with {', '.join(RUN_FIXTURES)}, not {name!r}")
    run: Run = request.getfixturevalue(RUN_FIXTURES[name])
    return run


def _delete_everything_under(url: str) -> None:
    from bucketsnap._storage import Storage
    from bucketsnap.testing._shared import objects

    storage = Storage(url)
    for rel in list(objects(storage)):
        storage.delete(rel)
