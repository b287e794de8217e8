"""bucketsnap.testing's pytest plugin, as a user's test session sees it (pytester): fresh runs, the backends
option, the header, servers that cannot start, and no server left behind.

Inline sessions (``runpytest``) only where they import no cloud SDK: pytester unloads what an inline session
imported, and some SDKs' native modules do not survive a second import in one process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import psutil
import pytest
import torch

import servers
from bucketsnap import SnapshotStore
from bucketsnap.testing._plugin import RUN_FIXTURES

FRESH_RUNS = """
import pytest

seen = set()


@pytest.mark.parametrize("i", [0, 1])
@pytest.mark.parametrize("fixture", {fixtures!r})
def test_a_fresh_empty_run(request, fixture, i):
    run = request.getfixturevalue(fixture)
    assert run.backend == fixture.split("_")[1]
    assert run.url not in seen
    seen.add(run.url)
    store = run.store()
    assert store.itrs() == []
    store.save(1, {{"x": i}})
    assert store.load(1) == {{"x": i}}
    sibling = run.sibling("other")
    assert sibling.url != run.url and sibling.store().itrs() == []
"""


@pytest.fixture(scope="module", autouse=True)
def _load_what_a_save_loads() -> None:
    """Import, in this process, the modules a memory save and load import on first use (torch among them), so
    that no inline session is the first to import them: pytester unloads those, and torch's native modules do
    not survive a second import."""
    store = SnapshotStore(f"memory://warm-up-{uuid.uuid4().hex[:8]}/run")
    store.save(1, {"x": torch.zeros(1)})
    assert torch.equal(store.load(1)["x"], torch.zeros(1))


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No external endpoints and no LocalStack venv named: what a new project has."""
    for name in (servers.S3_ENDPOINT_ENV, servers.GCS_ENDPOINT_ENV, servers.AZURE_CONNECTION_STRING_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv(servers.LOCALSTACK_VENV_ENV, raising=False)
    return monkeypatch


def test_each_fixture_gives_a_fresh_empty_run(pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(FRESH_RUNS.format(fixtures=["bucketsnap_memory_run", "bucketsnap_local_run"]))
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=4)


@pytest.mark.s3
@pytest.mark.gcs
@pytest.mark.azure
def test_each_server_fixture_gives_a_fresh_empty_run(pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv(servers.AZURITE_DIR_ENV, str(servers.azurite_dir()))
    fixtures = ["bucketsnap_s3_run", "bucketsnap_gcs_run", "bucketsnap_azure_run"]
    pytester.makepyfile(FRESH_RUNS.format(fixtures=fixtures))
    # In a new process: an inline session would unload the cloud SDKs it imported, which do not load twice.
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--bucketsnap-s3-server=moto")
    result.assert_outcomes(passed=6)


def test_a_memory_run_is_deleted_after_its_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        from fsspec.implementations.memory import MemoryFileSystem

        urls = []


        def test_save(bucketsnap_memory_run):
            bucketsnap_memory_run.store().save(1, {"x": 1})
            bucketsnap_memory_run.sibling().store().save(1, {"x": 2})
            urls.append(bucketsnap_memory_run.url.split("://")[1].split("/")[0])
            assert any(urls[0] in key for key in MemoryFileSystem.store)


        def test_gone():
            assert not [key for key in MemoryFileSystem.store if urls[0] in key]
        """
    )
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=2)


def test_bucketsnap_run_runs_a_test_on_each_backend_chosen(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest


        def test_any(bucketsnap_run):
            assert bucketsnap_run.store().itrs() == []


        @pytest.mark.parametrize("bucketsnap_run", ["local"], indirect=True)
        def test_by_hand(bucketsnap_run):
            assert bucketsnap_run.backend == "local"
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "-v", "--bucketsnap-backends=memory,local")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines_random(
        ["*test_any[[]memory[]] PASSED*", "*test_any[[]local[]] PASSED*", "*test_by_hand[[]local[]] PASSED*"]
    )
    pytester.makeini("[pytest]\nbucketsnap_backends = local\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines_random(["*test_any[[]local[]] PASSED*"])


def test_an_unknown_backend_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest("-p", "no:cacheprovider", "--bucketsnap-backends=memory,ftp")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--bucketsnap-backends takes some of memory, local, s3, gcs, azure*"])
    assert set(RUN_FIXTURES) == {"memory", "local", "s3", "gcs", "azure"}


def test_the_header_says_which_s3_server(pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch) -> None:
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest("-p", "no:cacheprovider", "--co")
    result.stdout.fnmatch_lines(["bucketsnap: S3 server: moto's server (no LocalStack venv at *)*"])
    venv = pytester.path / ".venv-localstack" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").touch()
    result = pytester.runpytest("-p", "no:cacheprovider", "--co")
    result.stdout.fnmatch_lines([f"bucketsnap: S3 server: LocalStack from {venv.parent}*"])
    result = pytester.runpytest("-p", "no:cacheprovider", "--co", "--bucketsnap-s3-server=moto")
    result.stdout.fnmatch_lines(["bucketsnap: S3 server: moto's server*"])
    clean_env.setenv(servers.S3_ENDPOINT_ENV, "http://127.0.0.1:9")
    result = pytester.runpytest("-p", "no:cacheprovider", "--co")
    result.stdout.fnmatch_lines(["bucketsnap: S3 server: the endpoint in BUCKETSNAP_TEST_S3_ENDPOINT*"])


def test_a_server_that_cannot_start_fails_the_tests_with_its_log(
    pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch
) -> None:
    venv = pytester.path / "broken-venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text("#!/bin/sh\necho 'LocalStack cannot start: no luck today' >&2\nexit 3\n")
    python.chmod(0o755)
    clean_env.setenv(servers.LOCALSTACK_VENV_ENV, str(venv))
    pytester.makepyfile(
        """
        def test_one(bucketsnap_s3_run):
            pass


        def test_two(bucketsnap_s3_run):
            pass
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "-rA")
    result.assert_outcomes(errors=2)  # never skipped
    result.stdout.fnmatch_lines(
        [
            "*bucketsnap: the S3 test server is not available: localstack failed to start (exited with code 3)*",
            "*LocalStack cannot start: no luck today*",
        ]
    )


def test_azurite_not_installed_fails_with_how_to_install_it(
    pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv(servers.AZURITE_DIR_ENV, str(pytester.path / "no-azurite"))
    pytester.makepyfile("def test_one(bucketsnap_azure_run):\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*Azurite not found*npm install --prefix .azurite azurite@3.35.0*"])


@pytest.mark.s3
def test_on_an_external_endpoint_the_sessions_bucket_is_deleted(
    pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch
) -> None:
    with servers.MotoServer() as external:
        external.create_bucket("someone-elses")
        clean_env.setenv(servers.S3_ENDPOINT_ENV, external.endpoint_url)
        pytester.makepyfile(FRESH_RUNS.format(fixtures=["bucketsnap_s3_run"]))
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
        result.assert_outcomes(passed=2)
        result.stdout.fnmatch_lines(["bucketsnap: S3 server: the endpoint in BUCKETSNAP_TEST_S3_ENDPOINT*"])
        buckets = external.client().list_buckets()["Buckets"]
        assert [bucket["Name"] for bucket in buckets] == ["someone-elses"]


SERVER_PID = """
import time
import uuid

def test_server(bucketsnap_s3_server, tmp_path_factory):
    with open({path!r}, "w") as fh:
        fh.write(str(bucketsnap_s3_server._process.proc.pid))
    time.sleep({sleep})
"""


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.s3
def test_no_server_is_left_running(pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch) -> None:
    pid_file = pytester.path / "server.pid"
    pytester.makepyfile(SERVER_PID.format(path=str(pid_file), sleep=0))
    pytester.runpytest("-p", "no:cacheprovider", "--bucketsnap-s3-server=moto").assert_outcomes(passed=1)
    assert not _alive(int(pid_file.read_text()))


@pytest.mark.s3
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_session_leaves_no_server_running(pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch) -> None:
    pid_file = pytester.path / "server.pid"
    pytester.makepyfile(SERVER_PID.format(path=str(pid_file), sleep=600))
    session = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--bucketsnap-s3-server=moto"],
        cwd=pytester.path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not pid_file.exists() or not pid_file.read_text():
            assert session.poll() is None and time.monotonic() < deadline, "the inner session never started moto"
            time.sleep(0.1)
        server = int(pid_file.read_text())
        assert _alive(server)
        os.kill(session.pid, signal.SIGKILL)  # no fixture teardown runs
        session.wait()
        deadline = time.monotonic() + 10
        while _alive(server) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(server)
    finally:
        session.kill()
        session.wait()


def test_pytest_finds_the_plugin_through_its_entry_point() -> None:
    from importlib.metadata import entry_points

    (plugin,) = [ep for ep in entry_points(group="pytest11") if ep.name == "bucketsnap"]
    assert plugin.value == "bucketsnap.testing._plugin"


def test_loading_the_plugin_imports_no_server_client_and_no_torch() -> None:
    code = (
        "import sys, bucketsnap._store\n"
        "before = set(sys.modules)\n"
        "import bucketsnap.testing, bucketsnap.testing._plugin\n"
        "heavy = {'torch', 'boto3', 'botocore', 'moto', 's3fs', 'gcsfs', 'adlfs', 'azure', 'google'}\n"
        "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
