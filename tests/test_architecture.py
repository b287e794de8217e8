"""The layering that docs/architecture.md describes, held by reading the source.

Storage knowledge lives in :mod:`bucketsnap._storage` and the backend modules under :mod:`bucketsnap._backends`;
nothing above them imports fsspec, touches a filesystem object or names a protocol.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parent.parent / "src" / "bucketsnap"
STORAGE_LAYER = {"_storage.py"}
#: Protocol names that would mean a module above the storage layer branches on the backend.
PROTOCOLS = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "file", "memory"}


def _modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if p.relative_to(SRC).parts[0] != "_backends")


def _above_storage() -> list[Path]:
    return [p for p in _modules() if p.relative_to(SRC).as_posix() not in STORAGE_LAYER]


@pytest.mark.parametrize("module", _above_storage(), ids=lambda p: p.relative_to(SRC).as_posix())
def test_nothing_above_the_storage_layer_touches_fsspec(module: Path) -> None:
    tree = ast.parse(module.read_text(), str(module))
    imports = [
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
        if alias.name.split(".")[0] == "fsspec"
    ] + [
        node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fsspec"
    ]
    assert not imports, f"{module.name} imports {imports}: go through bucketsnap._storage.Storage"
    touches = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == "fs"]
    assert not touches, f"{module.name} uses a filesystem object (.fs) at lines {touches}"


@pytest.mark.parametrize("module", _above_storage(), ids=lambda p: p.relative_to(SRC).as_posix())
def test_nothing_above_the_storage_layer_branches_on_a_protocol(module: Path) -> None:
    tree = ast.parse(module.read_text(), str(module))
    compared = [
        (node.lineno, const.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Compare)
        for const in ast.walk(node)
        if isinstance(const, ast.Constant) and const.value in PROTOCOLS
    ]
    assert not compared, f"{module.name} compares against protocol names: {compared}"


def test_backend_modules_do_not_import_what_is_above_them() -> None:
    allowed = {"bucketsnap._backends", "bucketsnap.errors", "bucketsnap._transport", "bucketsnap._uploads"}
    for module in sorted((SRC / "_backends").glob("*.py")):
        tree = ast.parse(module.read_text(), str(module))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bucketsnap"):
                assert any(node.module == a or node.module.startswith(a + ".") for a in allowed), (
                    f"{module.name} imports {node.module}"
                )
