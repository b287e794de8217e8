"""docs/testing.md's example, run as a new project would run it: its files in an empty folder, plain pytest in a
new process, the plugin found through its entry point, no LocalStack venv (so moto's server)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[1] / "docs" / "testing.md"
#: A file of the example: a ```py block (tests/test_docs.py runs the ```python ones as snippets) named by a comment.
FILE = re.compile(r"^<!-- file: (\S+) -->\n```py\n(.*?)^```", re.S | re.M)


def example_files() -> dict[str, str]:
    return dict(FILE.findall(PAGE.read_text()))


def test_the_page_has_the_example() -> None:
    assert set(example_files()) == {"train.py", "test_train.py"}
    test_file = example_files()["test_train.py"]
    assert len(test_file.splitlines()) <= 25  # the short test file the page promises


def test_the_example_passes_on_memory(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default run's half of the test below: the example's files, plain pytest in a new process, on memory.
    Its S3 half is held in the default run by tests/test_testing_preempt.py's [s3] variants (the same preempt on
    the S3 server) and tests/test_testing_plugin.py (moto's server chosen and named in the header)."""
    for env in ("BUCKETSNAP_TEST_S3_ENDPOINT", "BUCKETSNAP_LOCALSTACK_VENV"):
        monkeypatch.delenv(env, raising=False)
    for name, text in example_files().items():
        (pytester.path / name).write_text(text)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--bucketsnap-backends=memory", timeout=600)
    result.stdout.fnmatch_lines(["*bucketsnap_run on memory;*"])
    result.assert_outcomes(passed=2)


@pytest.mark.s3
@pytest.mark.slow  # 45-95 s: on demand (`-m slow`); test_the_example_passes_on_memory runs by default
def test_the_example_passes_on_memory_and_s3(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    for env in ("BUCKETSNAP_TEST_S3_ENDPOINT", "BUCKETSNAP_LOCALSTACK_VENV"):
        monkeypatch.delenv(env, raising=False)
    for name, text in example_files().items():
        (pytester.path / name).write_text(text)
    started = time.monotonic()
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--bucketsnap-backends=memory,s3", timeout=600)
    seconds = time.monotonic() - started
    result.stdout.fnmatch_lines(["bucketsnap: S3 server: moto's server*", "*bucketsnap_run on memory, s3*"])
    result.assert_outcomes(passed=4)
    print(f"docs/testing.md's example: 4 tests in {seconds:.1f} s")


def test_the_page_names_every_fixture() -> None:
    from bucketsnap.testing import _plugin

    page = PAGE.read_text()
    for name in _plugin.__all__:
        assert f"`{name}`" in page, name
