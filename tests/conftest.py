"""Fixtures: one contract suite over memory, local disk, S3 (LocalStack), GCS (fake-gcs-server) and Azure Blob
Storage (Azurite).

The servers are the ``bucketsnap.testing`` plugin's, the one users get with ``bucketsnap[testing]``: they start
once per session on 127.0.0.1 (a server that fails to start fails the tests, with its log) and the plugin reports
which in pytest's header. Each test gets its own bucket prefix, so no reset is needed between tests.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

sys.path.insert(0, str(Path(__file__).parent))
# tianshou's buffer helpers are numba functions, compiled in each new process (15-60 s on these machines) unless
# the JIT is off; the tests (tianshou's, the docs examples') and the processes they start need none of its speed.
os.environ.setdefault("NUMBA_DISABLE_JIT", "1")

import servers

pytest_plugins = ["pytester"]  # the plugin's own tests run pytest as a user would

BACKENDS = ["memory", "local", "s3", "gcs", "azure"]
SERVER_BACKENDS = ("s3", "gcs", "azure")  # each has a marker of its name


@dataclass
class Backend:
    """A place to put runs: ``url(name)`` gives a fresh run URL, ``options`` the storage options."""

    name: str
    base: str
    options: dict[str, Any] = field(default_factory=dict)

    def url(self, name: str = "run") -> str:
        return f"{self.base}/{name}-{uuid.uuid4().hex[:8]}"

    def store(self, name: str = "run", **kwargs: Any) -> Any:
        from bucketsnap import SnapshotStore

        return SnapshotStore(self.url(name), storage_options=self.options, **kwargs)


@pytest.fixture(autouse=True)
def _clean_fsspec_state() -> Iterator[None]:
    """fsspec's memory store is one global dict, and filesystem instances are cached: reset both."""
    yield
    MemoryFileSystem.store.clear()
    MemoryFileSystem.pseudo_dirs[:] = [""]
    fsspec.AbstractFileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def s3_server(bucketsnap_s3_server: servers.S3Server) -> servers.S3Server:
    return bucketsnap_s3_server


@pytest.fixture(scope="session")
def gcs_server(bucketsnap_gcs_server: servers.GcsServer) -> servers.GcsServer:
    return bucketsnap_gcs_server


@pytest.fixture(scope="session")
def azure_server(bucketsnap_azure_server: servers.AzureServer) -> servers.AzureServer:
    return bucketsnap_azure_server


@pytest.fixture(scope="session")
def s3_backend(s3_server: servers.S3Server) -> Backend:
    bucket = s3_server.create_bucket()
    return Backend("s3", f"s3://{bucket}", servers.s3_storage_options(s3_server))


@pytest.fixture(scope="session")
def gcs_backend(gcs_server: servers.GcsServer) -> Backend:
    bucket = gcs_server.create_bucket()
    return Backend("gcs", f"gs://{bucket}", servers.gcs_storage_options(gcs_server))


@pytest.fixture(scope="session")
def azure_backend(azure_server: servers.AzureServer) -> Backend:
    container = azure_server.create_container()
    return Backend("azure", f"az://{container}", servers.azure_storage_options(azure_server))


@pytest.fixture
def local_backend(tmp_path: Path) -> Backend:
    return Backend("local", str(tmp_path))


@pytest.fixture
def memory_backend() -> Backend:
    return Backend("memory", f"memory://bucketsnap-tests-{uuid.uuid4().hex[:8]}")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    """Every backend in turn."""
    name = request.param
    if name in SERVER_BACKENDS:
        request.applymarker(getattr(pytest.mark, name))
    return request.getfixturevalue(f"{name}_backend")  # type: ignore[no-any-return]


@pytest.fixture(params=["local", "s3", "gcs", "azure"])
def process_backend(request: pytest.FixtureRequest) -> Backend:
    """Backends that several processes can share (memory cannot)."""
    if request.param in SERVER_BACKENDS:
        request.applymarker(getattr(pytest.mark, request.param))
    return request.getfixturevalue(f"{request.param}_backend")  # type: ignore[no-any-return]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "azure: needs the Azure Blob test server")


#: Files whose tests kill processes, run campaigns or preempt, once per backend: their GCS and Azure variants
#: are the slowest tests of the suite and run on demand (`./scripts/test.sh -m slow`). The same behaviour stays
#: in the default run on memory, local disk and S3, and every backend's contract (test_storage_contract.py) and
#: first-contact errors (test_unreachable.py) stay in it.
SLOW_ON_GCS_AND_AZURE = {
    "test_crash.py",
    "test_campaigns.py",
    "test_preemption.py",
    "test_testing_preempt.py",
    "test_transient_after_contact.py",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        params = getattr(item, "callspec", None)
        values = list(params.params.values()) if params is not None else []
        on_gcs_or_azure = any(isinstance(v, str) and v in ("gcs", "azure") for v in values)
        if item.path.name in SLOW_ON_GCS_AND_AZURE and on_gcs_or_azure:
            item.add_marker(pytest.mark.slow)
