"""The command line starts fast: importing bucketsnap, and every command that decodes no tensor, leave torch
(seconds to import) and numpy (a tenth of a second) unimported; the package root imports its names on first use
(issue 16)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import bucketsnap

#: Runs the console script's main() with the given arguments, then prints which heavy modules it imported.
PROBE = (
    "import sys\n"
    "from bucketsnap._cli import main\n"
    "try:\n"
    "    main(sys.argv[1:])\n"
    "except SystemExit as exit:\n"
    "    code = exit.code\n"
    "print('\\nMODULES', sorted(m for m in ('torch', 'safetensors', 'numpy', 's3fs', 'gcsfs') if m in sys.modules))\n"
    "print('EXIT', code)\n"
)


def run_cli(*args: str) -> tuple[list[str], int, str]:
    """The heavy modules ``bucketsnap ARGS`` imported, its exit code, and its output."""
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120)
    modules_line = next(line for line in done.stdout.splitlines() if line.startswith("MODULES"))
    exit_line = next(line for line in done.stdout.splitlines() if line.startswith("EXIT"))
    modules = ast.literal_eval(modules_line.removeprefix("MODULES "))
    code = exit_line.removeprefix("EXIT ")
    return modules, int(code) if code.isdigit() else 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A local run with tensors, numpy arrays, replay-buffer chunks and a crash orphan."""
    import numpy as np
    import torch

    from bucketsnap import SnapshotStore
    from bucketsnap.buffers import TransitionStorage, buffer_state

    url = str(tmp_path_factory.mktemp("startup") / "run")
    store = SnapshotStore(url)
    storage = TransitionStorage(8)
    for itr in (1, 2):
        storage.insert_transition({"obs": np.full(2, itr, np.float32)})
        replay = buffer_state(storage, chunk_rows=1)
        store.save(itr, {"policy": {"w": torch.ones(3)}, "frames": np.zeros(4), "step": itr, "replay": replay})
    store.storage.fs.pipe_file(store.storage.path("snapshots/000000000003-deadbeefdeadbeef.zip"), b"PK half")
    return url


def test_import_bucketsnap_imports_no_torch() -> None:
    code = "import sys, bucketsnap; print(sorted(m for m in ('torch', 'numpy', 'fsspec') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_help_imports_neither_torch_nor_the_store() -> None:
    modules, code, output = run_cli("--help")
    assert code == 0 and "Usage:" in output
    assert modules == [], "--help needs click alone"


@pytest.mark.parametrize(
    "command",
    [
        ["ls"],
        ["ls", "--json"],
        ["show"],
        ["show", "--itr", "first", "--json"],
        ["verify", "--all"],
        ["gc", "--dry-run"],
        ["gc", "--min-age", "0"],
    ],
)
def test_commands_that_decode_no_tensor_import_no_torch(run: str, command: list[str]) -> None:
    modules, code, output = run_cli(command[0], run, *command[1:])
    assert code == 0, output
    assert "torch" not in modules and "safetensors" not in modules, (modules, output)
    assert "numpy" not in modules, "chunks are met by name only (bucketsnap._chunk_names), never decoded"


def test_cp_imports_no_torch(run: str, tmp_path: Path) -> None:
    modules, code, output = run_cli("cp", run, str(tmp_path / "copy"), "--all")
    assert code == 0 and "copied itr 2" in output, output
    assert "torch" not in modules and "numpy" not in modules


def test_listing_a_folder_of_runs_imports_no_torch(run: str) -> None:
    modules, code, output = run_cli("ls", str(Path(run).parent), "--json")
    assert code == 0 and json.loads(output.split("\nMODULES")[0])[0]["snapshots"] == 2, output
    assert "torch" not in modules and "numpy" not in modules


def test_restore_imports_torch_where_it_writes_tensors(run: str, tmp_path: Path) -> None:
    modules, code, output = run_cli("restore", run, "--key", "policy", "-o", str(tmp_path / "policy.pt"))
    assert code == 0, output
    assert "torch" in modules


def test_the_store_reads_without_torch(run: str) -> None:
    code = (
        "import sys; from bucketsnap import SnapshotStore; store = SnapshotStore(sys.argv[1]); "
        "print(store.itrs(), store.verify(1).itr, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code, run], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[1,", "2]", "1", "False"]


def test_the_lazy_root_names_the_same_things_as_its_type_checking_imports() -> None:
    """``bucketsnap/__init__.py`` lists its lazy names twice: in the table ``__getattr__`` reads, and as imports
    under ``TYPE_CHECKING`` for type checkers. Both must agree, and with ``__all__``."""
    tree = ast.parse(Path(bucketsnap.__file__).read_text())
    imported: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "_TYPE_CHECKING":
            for statement in node.body:
                assert isinstance(statement, ast.ImportFrom) and statement.module is not None
                imported.update({alias.name: statement.module for alias in statement.names})
    assert imported == bucketsnap._LAZY
    assert set(bucketsnap._LAZY) <= set(bucketsnap.__all__)
    for name in bucketsnap.__all__:
        assert name in dir(bucketsnap)
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        bucketsnap.nonsense  # type: ignore[attr-defined]  # noqa: B018


def test_each_lazy_name_is_the_object_of_its_module() -> None:
    import importlib

    for name, module in bucketsnap._LAZY.items():
        assert getattr(bucketsnap, name) is getattr(importlib.import_module(module), name)
